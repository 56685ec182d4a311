"""Selected eigenpairs of a symmetric k x k matrix G through a band form (CPU, LAPACK's two-stage reduction).

The one-stage reduction to tridiagonal form (sytrd, ``rosa_ds.tridiag``) spends half its 4/3 k^3
flops in matrix-vector products, which run at memory speed. LAPACK's two-stage reduction does
almost all of that work as matrix-matrix products:

1. ``reduce``: G = Q1 B Q1^T with B banded, ``kd`` subdiagonals (sytrd_sy2sb: blocked Householder,
   BLAS 3; Q1 kept as reflectors, never formed), then B -> T tridiagonal by bulge chasing
   (sytrd_sb2st, O(k^2 kd) flops, vectors not kept); eigenvalues of T by bisection, only at the
   indices asked for (stebz, O(k) per step).
2. ``vectors``: the eigenvectors of B for the requested indices only, by inverse iteration with
   B itself in fp64: per eigenvalue one banded LU of B - lambda I (O(k kd^2)) and a few solves,
   vectors of close eigenvalues orthogonalized against each other each iteration (as LAPACK's stein
   does for a tridiagonal matrix). LAPACK's sb2st cannot keep its own transformation (VECT='V' is
   "not available in this release"), so the vectors come from B, not from T.
3. the back-transformation V = Q1 Z (``torch.ormqr``, 2 k^2 per vector) in G's dtype.

Accuracy: the reduction is backward stable (B = Q1^T (G + E) Q1, |E| ~ eps |G| in G's dtype) and
inverse iteration stops at a residual |B z - lambda z| <= ``TOL`` eps |B| for eps of G's dtype,
so the pairs carry syevd's residual. A vector that has not converged after ``MAX_ITERATIONS``
raises ``NotConverged`` and the caller uses the one-stage path for that matrix.

The routines are not in SciPy's wrappers; they are found by ``ctypes`` in the LAPACK SciPy itself
loaded (its OpenBLAS exports them, prefixed ``scipy_``), through threadpoolctl's list of loaded BLAS
libraries. ``available`` says whether they were found; without them the caller uses ``tridiag``.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from . import tridiag

# Subdiagonals of the band: sy2sb's BLAS-3 share grows with kd, sb2st's O(k^2 kd) cost too.
# 64 is the fastest on a 2560 x 2560 Gram matrix (bench/results/resample_cost_notes.md: 0.40 s against
# 0.61 s at 16 and 0.52 s at 128, one thread); smaller matrices take k // 8.
KD = 64
# Inverse iteration: at most this many solves per vector until the residual is TOL eps |B|_1, then
# EXTRA more (as stein), which take the residual to the shift's own accuracy at the cost of one solve.
MAX_ITERATIONS = 6
EXTRA = 1
TOL = 64.0
# Eigenvalues closer than this share of |B|_1 form a cluster whose vectors are orthogonalized
# against each other (stein's 1e-3).
CLUSTER = 1e-3


class NotConverged(RuntimeError):
    """Inverse iteration did not reach its residual for some requested eigenvalue."""


@functools.cache
def _routines() -> dict | None:
    """{'s': (sy2sb, sb2st, int type), 'd': (...)} from the first loaded LAPACK that has them, or None."""
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, which threadpoolctl then lists)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api != "blas":
            continue
        dll = ctypes.CDLL(lib.filepath)
        for prefix in ("scipy_", ""):
            for suffix, int_t in (("", ctypes.c_int32), ("64_", ctypes.c_int64)):
                names = {p: [f"{prefix}{p}sytrd_sy2sb_{suffix}", f"{prefix}{p}sytrd_sb2st_{suffix}"] for p in "sd"}
                if all(hasattr(dll, n) for pair in names.values() for n in pair):
                    return {p: (getattr(dll, a), getattr(dll, b), int_t) for p, (a, b) in names.items()}
    return None


def available(device: torch.device) -> bool:
    """Whether the band path can serve a tensor on ``device``: CPU tensors, with SciPy's LAPACK
    exporting the two-stage routines (and ``tridiag``'s SciPy routines for the eigenvalues)."""
    return tridiag.available(device) and _routines() is not None


@dataclass
class Band:
    """G = Q1 B Q1^T and B = Q2 T Q2^T: B's lower band ``band`` ((kd + 1) x k, fp64, LAPACK band
    storage: band[r, j] = B[j + r, j]), T's diagonal ``d`` (k,) and off-diagonal ``e`` (k-1,) in fp64
    (Q2 is not kept), and Q1 as sy2sb left it: reflectors below the kd-th subdiagonal of
    ``reflectors`` (k x k, G's dtype, G's own storage) with scales ``tau``."""

    kd: int
    band: np.ndarray
    d: np.ndarray
    e: np.ndarray
    reflectors: torch.Tensor
    tau: torch.Tensor
    eps: float  # unit roundoff of G's dtype: the accuracy the band represents G to
    _found: dict = field(default_factory=dict, repr=False)

    def value(self, i: int) -> float:
        """The i-th smallest eigenvalue (0-based), by bisection on T (stebz, O(k) per step): the R
        drawn ones and the largest are all a solve needs, not the whole spectrum."""
        if i not in self._found:
            _, w, _, _, info = tridiag.routines().dstebz(self.d, self.e, 2, 0.0, 0.0, i + 1, i + 1, 0.0, "E")
            _check(info, "stebz")
            self._found[i] = float(w[0])
        return self._found[i]

    @property
    def norm(self) -> float:
        """|B|_1 (= |G|_1 up to rounding), the scale of the residual and cluster tests."""
        b = np.abs(self.band)
        col = b.sum(axis=0)
        for r in range(1, self.kd + 1):  # the upper half: B[j - r, j] = band[r, j - r]
            col[r:] += b[r, :-r]
        return float(col.max())


def band_width(k: int) -> int:
    return max(1, min(KD, k // 8, k - 1))


def reduce(g: torch.Tensor) -> Band:
    """Two-stage reduction of the symmetric ``g`` (k x k, C-contiguous fp32 or fp64, CPU; only its
    lower triangle is read). ``g`` is overwritten: it holds Q1's reflectors afterwards."""
    with tridiag.threads():
        return _reduce(g)


def _reduce(g: torch.Tensor) -> Band:
    k = g.shape[0]
    kd = band_width(k)
    prefix = "d" if g.dtype == torch.float64 else "s"
    np_t = np.float64 if prefix == "d" else np.float32
    sy2sb, sb2st, int_t = _routines()[prefix]

    def ref(x):
        return ctypes.byref(int_t(x))

    # G's row-major storage is G^T = G column-major with the filled triangle on top: LAPACK's 'U'
    # path reads it in place (no copy), and its row-stored reflectors are then columns of ``g``
    # below the kd-th subdiagonal: geqrf's layout, which ``back_transform`` applies.
    if not g.is_contiguous() or g.dtype not in (torch.float32, torch.float64):
        raise ValueError("band.reduce needs a C-contiguous fp32 or fp64 matrix")
    a = g.numpy()
    ab = np.zeros((kd + 1, k), dtype=np_t, order="F")  # upper band storage: ab[kd + i - j, j] = B[i, j]
    tau = np.zeros(max(1, k - kd), dtype=np_t)
    info = int_t(0)
    work = np.zeros(1, dtype=np_t)
    args = lambda w, lw: (b"U", ref(k), ref(kd), a.ctypes, ref(k), ab.ctypes, ref(kd + 1), tau.ctypes,  # noqa: E731
                          w.ctypes, ref(lw), ctypes.byref(info), ctypes.c_size_t(1))
    sy2sb(*args(work, -1))
    work = np.zeros(max(1, int(work[0])), dtype=np_t)
    sy2sb(*args(work, work.size))
    _check(info.value, "sytrd_sy2sb")
    band = np.zeros((kd + 1, k))
    for r in range(kd + 1):  # lower storage: band[r, j] = B[j + r, j] = B[j, j + r] = ab[kd - r, j + r]
        band[r, :k - r] = ab[kd - r, r:]
    d, e = np.zeros(k, dtype=np_t), np.zeros(max(1, k - 1), dtype=np_t)
    hous, work = np.zeros(1, dtype=np_t), np.zeros(1, dtype=np_t)
    args2 = lambda h, lh, w, lw: (b"N", b"N", b"U", ref(k), ref(kd), ab.ctypes, ref(kd + 1), d.ctypes, e.ctypes,  # noqa: E731
                                  h.ctypes, ref(lh), w.ctypes, ref(lw), ctypes.byref(info),
                                  ctypes.c_size_t(1), ctypes.c_size_t(1), ctypes.c_size_t(1))
    sb2st(*args2(hous, -1, work, -1))
    hous, work = np.zeros(max(1, int(hous[0])), dtype=np_t), np.zeros(max(1, int(work[0])), dtype=np_t)
    sb2st(*args2(hous, hous.size, work, work.size))  # overwrites ab, after ``band`` copied it
    _check(info.value, "sytrd_sb2st")
    return Band(kd, band, d.astype(np.float64), e[:k - 1].astype(np.float64), g,
                torch.from_numpy(tau[:k - kd].copy()), float(np.finfo(np_t).eps))


def vectors(b: Band, ascending: list[int]) -> torch.Tensor:
    """Eigenvectors of G for the ``ascending`` eigenvalue indices (sorted, distinct), k x len(ascending),
    in the order given, in G's dtype. Raises ``NotConverged`` (see the module docstring)."""
    k = b.band.shape[1]
    if k == 1:
        return torch.ones(1, len(ascending), dtype=b.reflectors.dtype)
    with tridiag.threads():
        z = _inverse_iteration(b, ascending)
    return back_transform(b, torch.from_numpy(z).to(b.reflectors.dtype))


def back_transform(b: Band, z: torch.Tensor) -> torch.Tensor:
    """Q1 z (k x m). sy2sb's Q1 = H_1 ... H_{k-kd}, H_i's vector 1 at row i + kd and stored below it in
    column i: on rows kd..k-1 that is the Q of a QR factorization stored like geqrf's."""
    kd, k = b.kd, z.shape[0]
    if k <= kd + 1:
        return z
    out = z.clone()
    out[kd:] = torch.ormqr(b.reflectors[kd:, :k - kd], b.tau, z[kd:].contiguous())
    return out


def general_band(b: Band) -> np.ndarray:
    """B in gbtrf's storage ((3 kd + 1) x k, fp64; rows 0..kd-1 are LU's fill-in space):
    gb[2 kd + i - j, j] = B[i, j] for |i - j| <= kd."""
    kd, k = b.kd, b.band.shape[1]
    gb = np.zeros((3 * kd + 1, k))
    for r in range(kd + 1):
        gb[2 * kd + r, :k - r] = b.band[r, :k - r]  # B[j + r, j]
        if r:
            gb[2 * kd - r, r:] = b.band[r, :k - r]  # B[j - r, j] = B[j, j - r]
    return gb


def _inverse_iteration(b: Band, ascending: list[int]) -> np.ndarray:
    """T's indices -> B's eigenvectors (k x len(ascending), fp64), see the module docstring."""
    from scipy.linalg import lapack

    kd, k = b.kd, b.band.shape[1]
    gb = general_band(b)
    norm = b.norm
    tol = TOL * b.eps * norm
    rng = np.random.default_rng(0)  # fixed start vectors: every rank and every rerun gets the same bits
    out = np.empty((k, len(ascending)))
    cluster_start = 0
    for j, i in enumerate(ascending):
        lam = b.value(i)
        if j and lam - b.value(ascending[j - 1]) > CLUSTER * norm:
            cluster_start = j
        shifted = gb.copy()
        shifted[2 * kd] -= lam
        lu, piv, info = lapack.dgbtrf(shifted, kd, kd)
        if info > 0:  # an exact zero pivot: lambda is an eigenvalue to the last bit; move off it
            shifted[2 * kd] -= b.eps * norm
            lu, piv, info = lapack.dgbtrf(shifted, kd, kd)
        _check(info, "gbtrf")
        x = rng.uniform(-1.0, 1.0, k)
        x /= np.linalg.norm(x)
        passed = 0  # iterations since the residual first met TOL
        for _ in range(MAX_ITERATIONS + EXTRA):
            y, info = lapack.dgbtrs(lu, kd, kd, x[:, None], piv)
            _check(info, "gbtrs")
            y = y[:, 0]
            grown = np.linalg.norm(y)  # (B - lambda I) y = x, |x| = 1: the residual of y / |y| is 1 / |y|
            for _ in range(2):  # twice is enough (Kahan): keeps the cluster's vectors orthogonal to fp64 accuracy
                prev = out[:, cluster_start:j]
                y -= prev @ (prev.T @ y)
            x = y / np.linalg.norm(y)
            passed += bool(passed or 1.0 / grown <= tol)
            if passed > EXTRA:
                break
        if not passed:
            raise NotConverged(f"inverse iteration: eigenvalue {i} of {k} did not reach its residual")
        out[:, j] = x
    return out


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise RuntimeError(f"LAPACK {routine} failed (info={info}); use RosaConfig(solver='tridiag') for this model")
