"""Pure maths of ROSA: split a weight W (m x n) into a frozen part and trainable factors.

Given the SVD  W = U diag(S) V^T  (U: m x k, S: k, V^T: k x n, k = min(m, n)) and an index set
I of R singular triplets,

    A   = U[:, I] diag(sqrt(S[I]))        (m x R)
    B   = diag(sqrt(S[I])) V^T[I, :]      (R x n)
    W_f = W - A B                          (m x n)

so that W_f + A B = W up to fp32 rounding. The layer computes y = x W_f^T + (x B^T) A^T.
Everything here runs in fp32 (or fp64 if given) whatever the storage dtype: a bf16 SVD loses
the small singular values the ``smallest`` strategy relies on.

Four solvers give the singular directions (``RosaConfig.solver``):

- ``svd``: ``torch.linalg.svd`` of W (LAPACK gesdd on CPU).
- ``gram``: with X = W oriented tall (p x k, p >= k, k = min(m, n)), the eigenvectors
  of the k x k Gram matrix G = X^T X are X's right singular vectors and its eigenvalues are
  S^2. One fp32 GEMM and one symmetric eigensolve cost about half of the SVD's time
  (bench/results/solvers.md has the measurement).
  Squaring costs accuracy where S_i^2 < ~1e-3 S_0^2:
  there G's rounding (eps_32 |G|) is no longer small against S_i^2, so that tail's vectors are
  refined by a Rayleigh-Ritz step in fp64 with X itself (not G): Y = X V_tail, the SVD of the
  thin p x t matrix Y rotates V_tail onto X's singular vectors and gives S_tail unsquared.
- ``tridiag``: the same Gram matrix (its lower triangle only), but one tridiagonal
  reduction and only the R drawn eigenpairs (``rosa_ds.tridiag``): the draw needs k only, so it
  comes first. The tail is computed and refined only when a drawn index lies in it, and then by
  the eigenvectors of the t x t fp64 matrix Y^T Y for the drawn indices instead of an SVD of Y.
  SciPy's LAPACK serves CPU tensors; on an accelerator ``tridiag`` is ``gram``.
- ``band`` (default): the Gram matrix reduced in two stages, to a band (matrix-matrix work) and
  then to tridiagonal for the eigenvalues only, and the R drawn eigenvectors by inverse iteration
  on the band (``rosa_ds.band``). Where a drawn index lies in the tail, G is formed and reduced
  again in fp64 instead of refining a t-dimensional tail subspace: fp64 rounding stays far below
  S_i^2 there. Below k = ``BAND_MIN``, on an accelerator or without the routines it is ``tridiag``
  (bench/results/resample_cost.md: the three side by side, seconds and residuals).

Either way the split is made exact for the directions actually chosen, V_I (k x R, orthonormal):
on the k side, s_i = |X v_i| and, in W's orientation,

    m >= n:  A = W V_I diag(1/sqrt(s)),  B = diag(sqrt(s)) V_I^T     (A B = W V_I V_I^T)
    m <  n:  A = V_I diag(sqrt(s)),      B = diag(1/sqrt(s)) V_I^T W  (A B = V_I V_I^T W)

which equals U_I diag(S_I) V_I^T when V_I are exact singular vectors, and otherwise is still an
exact projection of W onto the chosen subspace: W_f = W - A B holds the rest, and no solver
error can change the function the layer computes.

How s_i is split between the factors (``RosaConfig.factor_scale``; A B is the same either way):

    sqrt     A_i = u_i sqrt(s_i),  B_i = sqrt(s_i) v_i^T      (the paper's)
    uniform  A_i = u_i c,          B_i = (s_i / c) v_i^T,     c = sqrt(mean_I s)

A step of size eta on the factors moves W along direction i by about eta (|A_i| + |B_i|): under
``sqrt`` that is 2 eta sqrt(s_i), so a drawn direction of small s_i moves slowly at a rate that is
safe for the large ones; under ``uniform`` every direction moves by at least eta c, the scale of an
average drawn direction (as a LoRA factor's fixed-norm columns give).
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from . import band, tridiag
from .errors import ConfigError
from .utils.log import warn_rank0

if TYPE_CHECKING:
    from .config import RosaConfig


# SVDs computed in this process, counted so tests can check that each layer's SVD runs once in
# the world per resample (owner-rank coordination), not once per rank.
SVD_CALLS = {"count": 0, "seconds": 0.0}
SOLVERS = ("band", "tridiag", "gram", "svd")
STRATEGIES = ("random", "smallest", "largest")
FACTOR_SCALES = ("sqrt", "uniform")
# Gram eigenvalues below GRAM_TAIL * largest (S_i < 3.2% of S_0) are refined in fp64 (see above).
GRAM_TAIL = 1e-3
# fp64 work is done in row blocks of at most this many elements (32 MiB of fp64), so the extra memory
# of a merge or split is a few fp32 copies of one layer, never an fp64 copy of it.
BLOCK_ELEMENTS = 1 << 22
# Narrowest column block of the Gram matrix's lower triangle (``gram_lower``).
GRAM_BLOCK = 512
# Below this k the two-stage reduction does not pay (``band``): one thread, the one-stage path was as fast
# or faster up to k = 1536 (band took 0.95-1.9x its time from k = 192 to 1536, Intel Xeon).
BAND_MIN = 2048


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

    ``singular_values`` is sorted descending (as ``torch.linalg.svd`` returns them); only its
    length k is read (``draw_indices``)."""
    return draw_indices(singular_values.shape[-1], rank, strategy, generator)


def draw_indices(k: int, rank: int, strategy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted, int64, CPU) into k singular values sorted descending. They depend on k and
    the generator only, so a solver can draw them before computing any singular value.

    ``random`` draws R of the k indices uniformly without replacement: every index has
    probability R/k at every draw (unlike a random contiguous window, which under-samples
    the ends of the spectrum).
    """
    if not 1 <= rank <= k:
        raise ConfigError(f"rank {rank} is outside [1, {k}] for a matrix with {k} singular values")
    if strategy == "largest":
        idx = torch.arange(rank)
    elif strategy == "smallest":
        idx = torch.arange(k - rank, k)
    elif strategy == "random":
        idx = torch.randperm(k, generator=generator)[:rank]
    else:
        raise ConfigError(f"unknown strategy {strategy!r}")
    return torch.sort(idx).values


def singular_directions(x: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, V) of a tall matrix ``x`` (p x k, p >= k): S (k,) descending, V (k x k) its right
    singular vectors as columns, by the whole-spectrum ``solver`` ``gram`` or ``svd`` (see the
    module docstring)."""
    if solver == "svd":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        return s, vh.t()
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    lam, v = torch.linalg.eigh(x.t() @ x)  # ascending
    lam, v = lam.flip(0), v.flip(1)
    s = lam.clamp_min(0).sqrt()
    tail = tail_size(lam)
    if tail:
        s_tail, v_tail = refine_tail(x, v[:, -tail:])
        v, s = v.clone(), s.clone()
        v[:, -tail:] = v_tail.to(v.dtype)
        s[-tail:] = s_tail.to(s.dtype)
    return s, v


def tail_size(descending: torch.Tensor) -> int:
    """How many Gram eigenvalues (``descending``) lie below ``GRAM_TAIL`` times the largest."""
    return int((descending < GRAM_TAIL * descending[0]).sum()) if descending[0] > 0 else 0


def tail_image(x: torch.Tensor, v_tail: torch.Tensor) -> torch.Tensor:
    """Y = X V_tail (p x t) in fp64, in row blocks of X (no fp64 copy of X)."""
    v_tail = v_tail.double()
    y = torch.empty(x.shape[0], v_tail.shape[1], dtype=torch.float64, device=x.device)
    for rows in row_blocks(x.shape[0], x.shape[1]):
        y[rows] = x[rows].double() @ v_tail
    return y


def refine_tail(x: torch.Tensor, v_tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz on the tail subspace with X (p x k) itself, in fp64: (S_tail descending,
    V_tail (k x t) fp64). The subspace span(v_tail) is accurate (it is separated from the rest by
    a gap ~GRAM_TAIL |G| >> eps |G|), only the vectors inside it are not: the SVD of the thin
    Y = X V_tail (p x t) rotates them onto X's singular vectors and gives S_tail unsquared."""
    _, s_tail, qh = torch.linalg.svd(tail_image(x, v_tail), full_matrices=False)
    return s_tail, v_tail.double() @ qh.t()


def refine_tail_selected(x: torch.Tensor, v_tail: torch.Tensor, ascending: list[int]) -> torch.Tensor:
    """``refine_tail`` for a few vectors only: V_tail q_j (k x len(ascending), fp64) for the
    ``ascending`` eigenvalue indices of H = Y^T Y (t x t, fp64), Y = X V_tail, whose eigenvectors
    q_j are the rotation the SVD of Y gives. Squaring Y in fp64 is accurate here: cond(Y) <=
    sqrt(1 / GRAM_TAIL) cond(X) (~2e4 at cond(X) = 7e5), so H's relative error eps_64 cond(Y)^2
    stays ~1e-7, and H needs one tridiagonal reduction instead of an SVD of the p x t matrix Y."""
    h = gram_lower(tail_image(x, v_tail))
    return v_tail.double() @ tridiag.vectors(tridiag.reduce(h), ascending)


def gram_lower(x: torch.Tensor) -> torch.Tensor:
    """G = X^T X (k x k) with only its lower triangle computed (zeros above the diagonal blocks), in column
    blocks of at least ``GRAM_BLOCK``: ~(b + 1) / 2b of the full GEMM's flops for b blocks, while
    blocks stay wide enough for the GEMM to run at full speed."""
    k = x.shape[1]
    step = max(GRAM_BLOCK, -(-k // 4))
    if step >= k:
        return x.t() @ x
    g = torch.zeros(k, k, dtype=x.dtype, device=x.device)
    for j in range(0, k, step):
        g[j:, j:j + step] = x[:, j:].t() @ x[:, j:j + step]
    return g


def drawn_directions(x: torch.Tensor, rank: int, strategy: str, generator: torch.Generator,
                     solver: str) -> torch.Tensor:
    """V_I (k x R): the right singular vectors of the tall ``x`` (p x k) at the indices
    ``select_indices`` draws (in descending order of singular value), by ``solver``.

    ``band`` on a CPU tensor with k >= ``BAND_MIN``: ``_band_directions``; otherwise it is ``tridiag``.
    ``tridiag`` on a CPU tensor with SciPy: one tridiagonal reduction of G = X^T X and only the
    drawn eigenpairs (``rosa_ds.tridiag``); the tail subspace is computed and refined
    (``refine_tail``) only if a drawn index lies in it. Anywhere else ``tridiag`` is ``gram``
    (``torch.linalg.eigh`` on the tensor's device): SciPy's LAPACK never sees an accelerator tensor.
    """
    if solver == "band" and band.available(x.device) and x.shape[1] >= BAND_MIN:
        return _band_directions(x, draw_indices(x.shape[1], rank, strategy, generator), strategy)
    if solver in ("band", "tridiag") and tridiag.available(x.device):
        return _tridiag_directions(x, draw_indices(x.shape[1], rank, strategy, generator))
    if solver in ("band", "tridiag") and x.device.type == "cpu":
        _warn_no_scipy()
    s, v = singular_directions(x, "gram" if solver in ("band", "tridiag") else solver)
    return v[:, select_indices(s.cpu(), rank, strategy, generator).to(v.device)]


@functools.cache
def _warn_no_scipy() -> None:
    warn_rank0("solver 'tridiag' needs scipy and threadpoolctl on CPU; using 'gram' (same result, slower). "
               "Install them: pip install -r requirements.txt")


def _band_directions(x: torch.Tensor, idx: torch.Tensor, strategy: str) -> torch.Tensor:
    """V_I for descending indices ``idx`` (sorted) by the two-stage reduction (``rosa_ds.band``).

    The Gram matrix is formed and reduced in fp32 unless a drawn index lies in its tail (S_i^2 <
    ``GRAM_TAIL`` S_0^2), where fp32 rounding of G is no longer small against S_i^2: then G is formed
    again in fp64 (``gram64``) and reduced in fp64, whose rounding (eps_64 |G|) stays far below
    S_i^2 down to S_i ~ 1e-7 S_0, so no Rayleigh-Ritz refinement is needed. ``smallest`` draws from
    the tail whenever there is one and goes to fp64 at once. A vector whose inverse iteration does
    not converge sends this matrix to the one-stage path (``_tridiag_directions``).
    """
    k = x.shape[1]
    drawn = [k - 1 - int(i) for i in reversed(idx.tolist())]  # ascending eigenpair indices, as band wants
    try:
        if x.dtype == torch.float32 and strategy != "smallest":
            reduced = band.reduce(gram_lower(x))
            if reduced.value(drawn[0]) >= GRAM_TAIL * reduced.value(k - 1):  # no draw in the tail
                return band.vectors(reduced, drawn).flip(1)
        return band.vectors(band.reduce(gram64(x)), drawn).flip(1).to(x.dtype)
    except band.NotConverged:
        return _tridiag_directions(x, idx)


def gram64(x: torch.Tensor) -> torch.Tensor:
    """G = X^T X (k x k, lower triangle) accumulated in fp64 over row blocks of X: no fp64 copy of X.
    Products of fp32 numbers are exact in fp64, so G's only error is the fp64 summation's."""
    g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for rows in row_blocks(x.shape[0], x.shape[1]):
        g += gram_lower(x[rows].double())
    return g


def _tridiag_directions(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """V_I for descending indices ``idx`` (sorted): see ``drawn_directions``."""
    k = x.shape[1]
    tri = tridiag.reduce(gram_lower(x))
    tail = tail_size(torch.from_numpy(tri.values[::-1].copy()))
    drawn = [k - 1 - int(i) for i in idx]  # ascending indices of the drawn eigenpairs
    refine = tail and min(drawn) < tail
    # ascending order: the tail [0, tail) first when it is refined, then the drawn ones above it
    wanted = sorted({*(range(tail) if refine else ()), *drawn})
    v = tridiag.vectors(tri, wanted)
    column = {a: j for j, a in enumerate(wanted)}
    v_i = v[:, [column[a] for a in drawn]]
    if refine:
        in_tail = sorted((j for j, a in enumerate(drawn) if a < tail), key=lambda j: drawn[j])  # ascending
        refined = refine_tail_selected(x, v[:, :tail], [drawn[j] for j in in_tail])
        v_i[:, in_tail] = refined.to(v_i.dtype)
    return v_i


def factorize(weight: torch.Tensor, rank: int, strategy: str, generator: torch.Generator, solver: str = "tridiag",
              frozen: bool = True, scale: str = "sqrt") -> Factors:
    """Split ``weight`` (m x n) into (W_f, A, B); see the module docstring for the maths.

    ``frozen=False`` skips W_f (returned as None) for callers that compute it themselves; ``scale``
    splits each s_i between A and B (module docstring). Runs with IEEE fp32 matmuls (``ieee_fp32``)
    whatever the global TF32 / bf16 setting.
    """
    with ieee_fp32():
        return _factorize(weight, rank, strategy, generator, solver, frozen, scale)


def side_norms(s: torch.Tensor, scale: str, wide: bool) -> torch.Tensor:
    """t (R,): the column norms of the factor built from V_I (A when ``wide``, else B^T); the other
    factor is X V_I / t, of norms s / t, so each A_i B_i carries s_i whatever the split."""
    if scale == "sqrt":
        return s.sqrt()
    if scale != "uniform":
        raise ConfigError(f"unknown factor scale {scale!r}; choose one of {', '.join(FACTOR_SCALES)}")
    c = s.mean().sqrt().clamp_min(torch.finfo(s.dtype).tiny)  # |A_i| = c: A is the V side when wide
    return c.expand_as(s) if wide else s / c


def _factorize(weight: torch.Tensor, rank: int, strategy: str, generator: torch.Generator, solver: str,
               frozen: bool, scale: str) -> Factors:
    w = weight.detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    # Tall orientation: the Gram matrix is then k x k, and LAPACK's divide-and-conquer SVD of a
    # tall matrix is faster than of its wide transpose (about 1.8x on a 576 x 1536 weight).
    wide = w.shape[0] < w.shape[1]
    x = w.t() if wide else w
    start = time.perf_counter()
    v_i = drawn_directions(x, rank, strategy, generator, solver)  # k x R, orthonormal
    SVD_CALLS["count"] += 1
    SVD_CALLS["seconds"] += time.perf_counter() - start
    xv = x @ v_i  # p x R
    # s_i = |X v_i| (exact for the chosen vector; a zero direction stays zero, not NaN)
    t = side_norms(xv.norm(dim=0).clamp_min(torch.finfo(w.dtype).tiny), scale, wide)
    if wide:  # W = X^T: V_I is W's left side
        a, b = v_i * t, (xv / t).t()
    else:
        a, b = xv / t, t[:, None] * v_i.t()
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
    return factorize(weight, config.rank, config.strategy, gen, config.solver, frozen, config.factor_scale)
