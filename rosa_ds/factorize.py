"""Pure maths of ROSA: split a weight W (m x n) into a frozen part and trainable factors.

Given the SVD  W = U diag(S) V^T  (U: m x k, S: k, V^T: k x n, k = min(m, n)) and an index set
I of R singular triplets,

    A   = U[:, I] diag(sqrt(S[I]))        (m x R)
    B   = diag(sqrt(S[I])) V^T[I, :]      (R x n)
    W_f = W - A B                          (m x n)

so that W_f + A B = W up to fp32 rounding. The layer computes y = x W_f^T + (x B^T) A^T.
Everything here runs in fp32 (or fp64 if given) whatever the storage dtype: a bf16 SVD loses
the small singular values the ``smallest`` strategy relies on.

Two solvers give the singular directions (``RosaConfig.solver``):

- ``svd``: ``torch.linalg.svd`` of W (LAPACK gesdd on CPU).
- ``gram`` (default): with X = W oriented tall (p x k, p >= k, k = min(m, n)), the eigenvectors
  of the k x k Gram matrix G = X^T X are X's right singular vectors and its eigenvalues are
  S^2. One fp32 GEMM and one symmetric eigensolve cost ~2.2x less than the SVD (SmolLM2-135M's
  210 matrices, one thread of a 2-core AMD EPYC: 5.85 s vs 12.86 s, bench/results/solvers.md).
  Squaring costs accuracy where S_i^2 < ~1e-3 S_0^2:
  there G's rounding (eps_32 |G|) is no longer small against S_i^2, so that tail's vectors are
  refined by a Rayleigh-Ritz step in fp64 with X itself (not G): Y = X V_tail, the SVD of the
  thin p x t matrix Y rotates V_tail onto X's singular vectors and gives S_tail unsquared.

Either way the split is made exact for the directions actually chosen, V_I (k x R, orthonormal):
on the k side, s_i = |X v_i| and, in W's orientation,

    m >= n:  A = W V_I diag(1/sqrt(s)),  B = diag(sqrt(s)) V_I^T     (A B = W V_I V_I^T)
    m <  n:  A = V_I diag(sqrt(s)),      B = diag(1/sqrt(s)) V_I^T W  (A B = V_I V_I^T W)

which equals U_I diag(S_I) V_I^T when V_I are exact singular vectors, and otherwise is still an
exact projection of W onto the chosen subspace: W_f = W - A B holds the rest, and no solver
error can change the function the layer computes.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import RosaConfig


# SVDs computed in this process, counted so tests can check that each layer's SVD runs once in
# the world per resample (owner-rank coordination), not once per rank.
SVD_CALLS = {"count": 0, "seconds": 0.0}
SOLVERS = ("gram", "svd")
STRATEGIES = ("random", "smallest", "largest")
# Gram eigenvalues below GRAM_TAIL * largest (S_i < 3.2% of S_0) are refined in fp64 (see above).
GRAM_TAIL = 1e-3
# fp64 work is done in row blocks of at most this many elements (32 MiB of fp64), so the extra memory
# of a merge or split is a few fp32 copies of one layer, never an fp64 copy of it.
BLOCK_ELEMENTS = 1 << 22


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 matmuls in full IEEE precision inside the block, whatever the caller's global setting.

    With TF32 on (CUDA, ``torch.backends.cuda.matmul.fp32_precision = "tf32"``, 10 mantissa bits)
    or bf16 (oneDNN on CPU), the Gram matrix carries a relative error of ~1e-3 instead of ~1e-7,
    and the tail threshold ``GRAM_TAIL`` (which assumes fp32 rounding) no longer separates the
    accurate eigenvectors from the ones to refine. The backend-specific settings are used (not
    ``torch.set_float32_matmul_precision``, which raises once a user mixed the legacy and new APIs).
    """
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Row slices of an (rows, cols) matrix holding at most ``BLOCK_ELEMENTS`` elements each."""
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def add_product(base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``base + left @ right`` accumulated in fp64 and rounded once to ``out_dtype``, in row blocks.

    base: (m, n); left: (m, k); right: (k, n). Extra memory: one fp64 block, not an m x n fp64 copy.
    Every element is the same fp64 expression whatever the block size, so the result does not
    depend on it (up to BLAS summation order over k, far below fp32 rounding)."""
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    right64 = right.double()
    for rows in row_blocks(*base.shape):
        out[rows] = torch.addmm(base[rows].double(), left[rows].double(), right64).to(out_dtype)
    return out


class Factors(NamedTuple):
    """New values for one adapted matrix, in the (out, in) = (m, n) orientation, fp32."""

    w_frozen: torch.Tensor | None  # m x n (None when the caller computes it: factorize(frozen=False))
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


def singular_directions(x: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, V) of a tall matrix ``x`` (p x k, p >= k): S (k,) descending, V (k x k) its right
    singular vectors as columns, by ``solver`` (see the module docstring)."""
    if solver == "svd":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        return s, vh.t()
    if solver != "gram":
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    lam, v = torch.linalg.eigh(x.t() @ x)  # ascending
    lam, v = lam.flip(0), v.flip(1)
    s = lam.clamp_min(0).sqrt()
    tail = int((lam < GRAM_TAIL * lam[0]).sum()) if lam[0] > 0 else 0
    if tail:
        # Rayleigh-Ritz on the tail subspace with X, in fp64: the subspace itself is accurate (it is
        # separated from the rest by a gap ~GRAM_TAIL |G| >> eps |G|), only the vectors inside it are not.
        v_tail = v[:, -tail:].double()
        y = torch.empty(x.shape[0], tail, dtype=torch.float64, device=x.device)
        for rows in row_blocks(x.shape[0], x.shape[1]):  # X V_tail in fp64 without an fp64 copy of X
            y[rows] = x[rows].double() @ v_tail
        _, s_tail, qh = torch.linalg.svd(y, full_matrices=False)
        v, s = v.clone(), s.clone()
        v[:, -tail:] = (v_tail @ qh.t()).to(v.dtype)
        s[-tail:] = s_tail.to(s.dtype)
    return s, v


def factorize(weight: torch.Tensor, rank: int, strategy: str, generator: torch.Generator, solver: str = "gram",
              frozen: bool = True) -> Factors:
    """Split ``weight`` (m x n) into (W_f, A, B); see the module docstring for the maths.

    ``frozen=False`` skips W_f (returned as None) for callers that compute it themselves. Runs with
    IEEE fp32 matmuls (``ieee_fp32``) whatever the global TF32 / bf16 setting.
    """
    with ieee_fp32():
        return _factorize(weight, rank, strategy, generator, solver, frozen)


def _factorize(weight: torch.Tensor, rank: int, strategy: str, generator: torch.Generator, solver: str,
               frozen: bool) -> Factors:
    w = weight.detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    # Tall orientation: the Gram matrix is then k x k, and LAPACK's divide-and-conquer SVD is
    # ~1.8x faster on it (576x1536 0.13 s, its transpose 0.072 s, one thread of a 2-core Xeon).
    wide = w.shape[0] < w.shape[1]
    x = w.t() if wide else w
    start = time.perf_counter()
    s, v = singular_directions(x, solver)
    SVD_CALLS["count"] += 1
    SVD_CALLS["seconds"] += time.perf_counter() - start
    idx = select_indices(s.cpu(), rank, strategy, generator).to(w.device)
    v_i = v[:, idx]  # k x R, orthonormal
    xv = x @ v_i  # p x R
    # s_i = |X v_i| (exact for the chosen vector; a zero direction stays zero, not NaN)
    root = xv.norm(dim=0).clamp_min(torch.finfo(w.dtype).tiny).sqrt()
    if wide:  # W = X^T: V_I is W's left side
        a, b = v_i * root, (xv / root).t()
    else:
        a, b = xv / root, root[:, None] * v_i.t()
    a, b = a.contiguous(), b.contiguous()
    return Factors(w_frozen=frozen_part(w, a, b) if frozen else None, a=a, b=b)


def frozen_part(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W_f = W - A B, accumulated in fp64 and rounded once to ``weight``'s dtype.

    Ranks that receive only the new (A, B) of a layer recompute W_f themselves from their own
    copy of W (instead of receiving the dense m x n W_f): in fp64 the product's summation order
    (BLAS build, thread count) cannot change the fp32 result except at an exact rounding tie,
    so every rank holds the same bits as the rank that ran the SVD.
    """
    return add_product(weight, a, b.neg(), weight.dtype)


def frozen_update(w_frozen: torch.Tensor, a_old: torch.Tensor, b_old: torch.Tensor, a_new: torch.Tensor,
                  b_new: torch.Tensor) -> torch.Tensor:
    """The new frozen part after a resample, W_f' = W_f + A B - A' B' (m x n, fp32).

    Accumulated in fp64 and rounded once, so it equals W - A' B' for the unrounded merged W and
    every rank computes the same bits from its own replica (see ``frozen_part``).
    """
    # one GEMM with inner size 2R: [A, -A'] [B; B'] = A B - A' B'
    left = torch.cat([a_old.float(), a_new.float().neg()], dim=1)
    right = torch.cat([b_old.float(), b_new.float()], dim=0)
    return add_product(w_frozen, left, right, torch.float32)


def merge_weight(w_frozen: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W = W_f + A B (m x n), accumulated in fp64 and rounded once to fp32: the SVD's input."""
    return add_product(w_frozen, a, b, torch.float32)


def lora_init(weight: torch.Tensor, rank: int, generator: torch.Generator) -> Factors:
    """Ablation init (``init="lora"``): A ~ U(-1/sqrt(n), 1/sqrt(n)) (m x R), B = 0, W_f = W.

    No SVD is computed; the product A B starts at zero as in LoRA.
    """
    m, n = weight.shape
    w = weight.detach().float()
    bound = 1.0 / float(n) ** 0.5
    a = (torch.rand(m, rank, generator=generator) * 2 - 1).mul_(bound).to(w.device)
    return Factors(w_frozen=w.clone(), a=a, b=torch.zeros(rank, n, device=w.device))


def new_factors(weight: torch.Tensor, config: RosaConfig, resample_index: int, layer_index: int,
                frozen: bool = True) -> Factors:
    """Factors for layer ``layer_index`` at resample ``resample_index`` (0 = at apply time).

    Deterministic in (config.seed, resample_index, layer_index): any rank, any process, any
    world size computes the same subspace.
    """
    gen = make_generator(layer_seed(config.seed, resample_index, layer_index))
    if config.init == "lora":
        return lora_init(weight, config.rank, gen)
    return factorize(weight, config.rank, config.strategy, gen, config.solver, frozen)
