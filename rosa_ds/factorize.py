"""Pure maths of ROSA: split a weight W (m x n) into a frozen part and trainable factors.

Given the SVD  W = U diag(S) V^T  (U: m x k, S: k, V^T: k x n, k = min(m, n)) and an index set
I of R singular triplets,

    A   = U[:, I] diag(sqrt(S[I]))        (m x R)
    B   = diag(sqrt(S[I])) V^T[I, :]      (R x n)
    W_f = W - A B                          (m x n)

so that W_f + A B = W up to fp32 rounding. The layer computes y = x W_f^T + (x B^T) A^T.
Everything here runs in fp32 (or fp64 if given) whatever the storage dtype: a bf16 SVD loses
the small singular values the ``smallest`` strategy relies on.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch

from .config import RosaConfig


# SVDs computed in this process, counted so tests can check that each layer's SVD runs once in
# the world per resample (owner-rank coordination), not once per rank.
SVD_CALLS = {"count": 0, "seconds": 0.0}


class Factors(NamedTuple):
    """New values for one adapted matrix, in the (out, in) = (m, n) orientation, fp32."""

    w_frozen: torch.Tensor  # m x n
    a: torch.Tensor  # m x R
    b: torch.Tensor  # R x n


def layer_seed(base_seed: int, resample_index: int, layer_index: int) -> int:
    """A 63-bit seed for one (resample, layer) draw, identical on every rank and process.

    SeedSequence mixes the three integers well, so neighbouring layers and resamples do not
    get correlated draws (a plain ``seed + i`` would make layer i at resample j+1 equal to
    layer i+1 at resample j).
    """
    state = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(resample_index), int(layer_index)])
    return int(state.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1, 1 << 31])) & ((1 << 63) - 1)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: CPU draws are bit-identical across machines and accelerators."""
    return torch.Generator(device="cpu").manual_seed(seed)


def select_indices(singular_values: torch.Tensor, rank: int, strategy: str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted, int64, CPU) of the R singular triplets to make trainable.

    ``singular_values`` is sorted descending (as ``torch.linalg.svd`` returns them).
    ``random`` draws R of the k indices uniformly without replacement: every index has
    probability R/k at every draw (unlike a random contiguous window, which under-samples
    the ends of the spectrum).
    """
    k = singular_values.shape[-1]
    if not 1 <= rank <= k:
        raise ValueError(f"rank {rank} is outside [1, {k}] for a matrix with {k} singular values")
    if strategy == "largest":
        idx = torch.arange(rank)
    elif strategy == "smallest":
        idx = torch.arange(k - rank, k)
    elif strategy == "random":
        idx = torch.randperm(k, generator=generator)[:rank]
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return torch.sort(idx).values


def factorize(weight: torch.Tensor, rank: int, strategy: str, generator: torch.Generator) -> Factors:
    """SVD-split ``weight`` (m x n) into (W_f, A, B); see the module docstring for the maths."""
    w = weight.detach().to(device="cpu" if weight.device.type == "meta" else weight.device)
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    start = time.perf_counter()
    if w.shape[0] < w.shape[1]:
        # LAPACK's divide-and-conquer SVD is ~1.8x faster on the tall orientation (measured on
        # the 2-core CPU, one thread: 576x1536 0.13 s, its transpose 0.072 s): W^T = U' S V'^T  =>  W = V' S U'^T.
        ut, s, vht = torch.linalg.svd(w.t(), full_matrices=False)
        u, vh = vht.t(), ut.t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    SVD_CALLS["count"] += 1
    SVD_CALLS["seconds"] += time.perf_counter() - start
    idx = select_indices(s.cpu(), rank, strategy, generator).to(w.device)
    root = s[idx].sqrt()
    a = (u[:, idx] * root).contiguous()
    b = (root[:, None] * vh[idx, :]).contiguous()
    return Factors(w_frozen=frozen_part(w, a, b), a=a, b=b)


def frozen_part(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W_f = W - A B, accumulated in fp64 and rounded once to ``weight``'s dtype.

    Ranks that receive only the new (A, B) of a layer recompute W_f themselves from their own
    copy of W (instead of receiving the dense m x n W_f): in fp64 the product's summation order
    (BLAS build, thread count) cannot change the fp32 result except at an exact rounding tie,
    so every rank holds the same bits as the rank that ran the SVD.
    """
    out = weight.double() - a.double() @ b.double()
    return out.to(weight.dtype).contiguous()


def frozen_update(w_frozen: torch.Tensor, a_old: torch.Tensor, b_old: torch.Tensor, a_new: torch.Tensor,
                  b_new: torch.Tensor) -> torch.Tensor:
    """The new frozen part after a resample, W_f' = W_f + A B - A' B' (m x n, fp32).

    Accumulated in fp64 and rounded once, so it equals W - A' B' for the unrounded merged W and
    every rank computes the same bits from its own replica (see ``frozen_part``).
    """
    out = torch.addmm(w_frozen.double(), a_old.double(), b_old.double())
    return out.sub_(a_new.double() @ b_new.double()).float().contiguous()


def lora_init(weight: torch.Tensor, rank: int, generator: torch.Generator) -> Factors:
    """Ablation init (``init="lora"``): A ~ U(-1/sqrt(n), 1/sqrt(n)) (m x R), B = 0, W_f = W.

    No SVD is computed; the product A B starts at zero as in LoRA.
    """
    m, n = weight.shape
    w = weight.detach().float()
    bound = 1.0 / float(n) ** 0.5
    a = (torch.rand(m, rank, generator=generator) * 2 - 1).mul_(bound).to(w.device)
    return Factors(w_frozen=w.clone(), a=a, b=torch.zeros(rank, n, device=w.device))


def new_factors(weight: torch.Tensor, config: RosaConfig, resample_index: int, layer_index: int) -> Factors:
    """Factors for layer ``layer_index`` at resample ``resample_index`` (0 = at apply time).

    Deterministic in (config.seed, resample_index, layer_index): any rank, any process, any
    world size computes the same subspace.
    """
    gen = make_generator(layer_seed(config.seed, resample_index, layer_index))
    if config.init == "lora":
        return lora_init(weight, config.rank, gen)
    return factorize(weight, config.rank, config.strategy, gen)
