"""Selected eigenpairs of a symmetric k x k matrix G from one tridiagonal reduction (CPU, LAPACK).

A full eigendecomposition (``torch.linalg.eigh``: LAPACK syevd) costs the reduction
G = Q T Q^T (sytrd, 4/3 k^3 flops, half of them matrix-vector), the eigenvectors of the
tridiagonal T (divide and conquer) and their back-transformation Q Z (2 k^3 flops). ROSA needs R of
the k eigenpairs, so after the reduction everything else is O(k) per pair:

1. ``reduce``: T = Q^T G Q (LAPACK sytrd through SciPy, in G's dtype; Q kept as Householder
   reflectors, never formed), and all eigenvalues of T in fp64 (sterf, O(k^2), no vectors).
2. ``vectors``: eigenvectors z_j of T in fp64 for the requested indices only: bisection and
   inverse iteration (stebz + stein) for isolated indices, MRRR (stemr) for a contiguous range,
   or divide and conquer (stevd) when the range is a large share of the spectrum.
3. the back-transformation V = Q Z (``torch.ormqr``, 2 k^2 per vector) in G's dtype.

Every step is backward stable, so the eigenpairs carry the same residual as syevd's,
|G v - lambda v| ~ eps |G|. SciPy's LAPACK runs on the CPU only (threadpoolctl holds its BLAS to
torch's thread count): ``available`` says whether this path can serve a tensor on a given device;
on an accelerator, or without SciPy, the caller uses ``torch.linalg.eigh``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

# Contiguous index ranges longer than this share of k get all of T's vectors by divide and conquer
# (stevd), whose cost does not grow with the count; shorter ranges use MRRR, O(k) per vector.
DC_SHARE = 0.25
# Runs of more consecutive indices than this (a refined tail) get range solvers, not one bisection each.
RUN = 8


@functools.cache
def _backend():
    """(scipy.linalg.lapack, a threadpoolctl controller of the loaded BLAS libraries), or None."""
    try:
        from scipy.linalg import lapack
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return lapack, ThreadpoolController()  # after SciPy's import, so it sees SciPy's own OpenBLAS


def routines():
    return _backend()[0]


def threads():
    """SciPy's OpenBLAS limited to torch's thread count for the block: by default it starts a thread
    per core, and two ranks on two cores, each with a spinning pool, run many times slower."""
    return _backend()[1].limit(limits=torch.get_num_threads(), user_api="blas")


def available(device: torch.device) -> bool:
    """Whether the tridiagonal path can serve a tensor on ``device``: CPU tensors, with SciPy and
    threadpoolctl installed."""
    return torch.device(device).type == "cpu" and _backend() is not None


@dataclass
class Tridiagonal:
    """G = Q T Q^T: T's diagonal ``d`` (k,) and off-diagonal ``e`` (k-1,) in fp64, its eigenvalues
    ``values`` (k,) ascending in fp64, and Q as sytrd left it: reflectors below the first
    subdiagonal of ``reflectors`` (k x k, G's dtype) with scales ``tau`` (k-1,)."""

    d: np.ndarray
    e: np.ndarray
    values: np.ndarray
    reflectors: torch.Tensor
    tau: torch.Tensor


def reduce(g: torch.Tensor) -> Tridiagonal:
    """Tridiagonal reduction of the symmetric ``g`` (k x k, fp32 or fp64, CPU). Only the lower
    triangle is read."""
    with threads():
        return _reduce(g)


def _reduce(g: torch.Tensor) -> Tridiagonal:
    if g.shape[0] == 1:  # already tridiagonal; LAPACK's wrappers reject the empty off-diagonal
        d = g.double().numpy().reshape(1)
        return Tridiagonal(d, np.zeros(0), d.copy(), g.clone(), torch.zeros(0, dtype=g.dtype))
    lapack = routines()
    prefix = "d" if g.dtype == torch.float64 else "s"
    k = g.shape[0]
    lwork, info = getattr(lapack, prefix + "sytrd_lwork")(k, lower=1)  # the blocked (fast) workspace
    c, d, e, tau, info = getattr(lapack, prefix + "sytrd")(np.asfortranarray(g.numpy()), lower=1, lwork=int(lwork))
    _check(info, "sytrd")
    d, e = d.astype(np.float64), e.astype(np.float64)
    return Tridiagonal(d, e, eigenvalues(d, e), torch.from_numpy(np.ascontiguousarray(c)), torch.from_numpy(tau))


def eigenvalues(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """All eigenvalues (ascending, fp64) of the tridiagonal matrix with diagonal ``d`` and off-diagonal
    ``e`` (fp64), by LAPACK sterf (O(k^2), no vectors)."""
    values, info = routines().dsterf(d, e)
    _check(info, "sterf")
    return values


def vectors(tri: Tridiagonal, ascending: list[int]) -> torch.Tensor:
    """Eigenvectors of G for the ``ascending`` eigenvalue indices (sorted, distinct), k x len(ascending),
    in the order given, in G's dtype. Indices outside long runs share one inverse-iteration call,
    which orthogonalizes the vectors of close eigenvalues (stein's clusters) against each other."""
    k = tri.d.shape[0]
    if k == 1:
        return torch.ones(1, len(ascending), dtype=tri.reflectors.dtype)
    z = np.empty((k, len(ascending)))
    single = []
    with threads():
        for start, stop, cols in _runs(ascending):
            if stop - start > RUN:
                z[:, cols] = _range_vectors(tri, start, stop)
            else:
                single += range(cols.start, cols.stop)
        if single:
            z[:, single] = _isolated_vectors(tri, [ascending[j] for j in single])
    return back_transform(tri, torch.from_numpy(z).to(tri.reflectors.dtype))


def back_transform(tri: Tridiagonal, z: torch.Tensor) -> torch.Tensor:
    """Q z (k x m): sytrd's Q = H_1 ... H_{k-1} acts on rows 1..k-1 as the Q of a QR factorization
    stored like geqrf's, so LAPACK's ormqr applies it (what ormtr does) without forming Q."""
    if z.shape[0] == 1:
        return z
    out = z.clone()
    out[1:] = torch.ormqr(tri.reflectors[1:, :-1], tri.tau, z[1:].contiguous())
    return out


def _runs(ascending: list[int]):
    """(start, stop, columns) of the maximal runs of consecutive indices in ``ascending``."""
    begin = 0
    for j in range(1, len(ascending) + 1):
        if j == len(ascending) or ascending[j] != ascending[j - 1] + 1:
            yield ascending[begin], ascending[j - 1] + 1, slice(begin, j)
            begin = j


def _range_vectors(tri: Tridiagonal, start: int, stop: int) -> np.ndarray:
    """T's eigenvectors for ascending indices [start, stop), k x (stop - start), fp64."""
    lapack, k = routines(), tri.d.shape[0]
    if stop - start > DC_SHARE * k:
        _, z, info = lapack.dstevd(tri.d, tri.e, compute_v=1)
        _check(info, "stevd")
        return z[:, start:stop]
    # MRRR: no reorthogonalization, O(k) per vector even inside clusters
    m, _, z, info = lapack.dstemr(tri.d, np.append(tri.e, 0.0), 2, 0.0, 0.0, start + 1, stop)
    _check(info, "stemr")
    return z[:, :m]


def _isolated_vectors(tri: Tridiagonal, ascending: list[int]) -> np.ndarray:
    """T's eigenvectors for scattered ascending indices: each eigenvalue by bisection (stebz), then
    all vectors in one inverse-iteration call (stein), which wants them ordered by block, then value."""
    lapack = routines()
    found = []
    for i in ascending:
        m, w, iblock, isplit, info = lapack.dstebz(tri.d, tri.e, 2, 0.0, 0.0, i + 1, i + 1, 0.0, "B")
        _check(info, "stebz")
        found.append((int(iblock[0]), float(w[0])))
    order = sorted(range(len(found)), key=lambda j: found[j])
    w = np.zeros(tri.d.shape[0])
    blocks = np.zeros(tri.d.shape[0], dtype=np.int32)
    w[:len(order)] = [found[j][1] for j in order]
    blocks[:len(order)] = [found[j][0] for j in order]
    z, info = lapack.dstein(tri.d, tri.e, w[:len(order)], blocks, isplit)
    _check(info, "stein")
    out = np.empty((tri.d.shape[0], len(order)))
    out[:, order] = z[:, :len(order)]
    return out


def _check(info: int, routine: str) -> None:
    if info != 0:
        raise RuntimeError(f"LAPACK {routine} failed (info={info}); use RosaConfig(solver='gram') for this model")
