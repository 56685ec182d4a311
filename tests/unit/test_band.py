"""The two-stage (band) solver: rosa_ds.band against torch.linalg.eigh / svd, and its dispatch in factorize."""
import numpy as np
import pytest
import torch

import rosa_ds.factorize as fz
from rosa_ds import band
from rosa_ds.factorize import draw_indices, factorize, make_generator

pytestmark = pytest.mark.skipif(not band.available("cpu"), reason="the band solver needs SciPy's LAPACK with the "
                                "two-stage routines (requirements.txt)")


def _with_spectrum(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=g))
    return (u * s) @ v.t()


def _gram(k, values, seed=0):
    q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return (q * values) @ q.t()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_band_eigenpairs_match_eigh(dtype, tol):
    """Scattered indices, both ends included: the values are eigh's, the vectors span eigh's (up to sign)
    and each pair's residual |G v - lambda v| is at G's rounding."""
    k = 120
    g = _gram(k, torch.logspace(0, -2, k, dtype=torch.float64))
    lam, v = torch.linalg.eigh(g)
    b = band.reduce(torch.tril(g).to(dtype))  # only the lower triangle is read
    assert b.kd < k - 1  # a real band, not the whole matrix
    assert np.abs(np.array([b.value(i) for i in range(k)]) - lam.numpy()).max() < tol * float(lam[-1])
    wanted = [0, 3, 17, 60, 119]
    got = band.vectors(b, wanted).double()
    assert torch.allclose((got.t() @ v[:, wanted]).abs(), torch.eye(len(wanted), dtype=torch.float64), atol=50 * tol)
    residual = (g @ got - got * lam[wanted]).norm(dim=0).max() / lam[-1]
    assert residual < 10 * tol


def test_back_transform_is_the_reduction():
    """Q1 B Q1^T = G: Q1 from ``back_transform`` applied to the identity, B from the stored band."""
    k = 70
    g = _gram(k, torch.linspace(1, 5, k, dtype=torch.float64), seed=1)
    b = band.reduce(g.clone())  # reduce overwrites its input with the reflectors
    q = band.back_transform(b, torch.eye(k, dtype=torch.float64))
    dense = torch.zeros(k, k, dtype=torch.float64)
    for r in range(b.kd + 1):
        diag = torch.from_numpy(b.band[r, :k - r])
        dense += torch.diag(diag, -r) + (torch.diag(diag, r) if r else 0)
    assert torch.allclose(q @ dense @ q.t(), g, atol=1e-12) and torch.allclose(q.t() @ q, torch.eye(k, dtype=q.dtype))


def test_vectors_of_a_repeated_eigenvalue_are_orthonormal():
    """Fifty equal eigenvalues: inverse iteration alone would return one vector four times; the cluster's
    orthogonalization gives four orthonormal vectors of the eigenspace."""
    k = 150
    g = _gram(k, torch.cat([torch.ones(50), torch.linspace(2, 3, 100)]).double(), seed=2)
    b = band.reduce(g.clone())  # reduce overwrites its input with the reflectors
    got = band.vectors(b, [0, 1, 2, 49, 50])
    assert torch.allclose(got.t() @ got, torch.eye(5, dtype=got.dtype), atol=1e-12)
    lam = torch.tensor([b.value(i) for i in (0, 1, 2, 49, 50)], dtype=got.dtype)
    assert (g @ got - got * lam).norm(dim=0).max() < 1e-12


@pytest.fixture
def small_band(monkeypatch):
    monkeypatch.setattr(fz, "BAND_MIN", 1)  # the unit tests' matrices are far below the size it pays at


@pytest.mark.parametrize("cond, bound", [(1e5, 1e-3), (7e5, 2e-2)])
def test_band_solver_goes_to_fp64_for_the_tail(small_band, cond, bound, monkeypatch):
    """Condition numbers 1e5 and 7e5 (SmolLM2's q_proj) in fp32: the ``smallest`` triplets' S_i^2 lie far
    below the fp32 Gram matrix's rounding, so the solver forms and reduces G in fp64. Their values
    match the fp64 SVD of the fp32 matrix, and an fp32 Gram matrix in its place fails the bound."""
    s = torch.logspace(0, -np.log10(cond), 60, dtype=torch.float64)
    w = _with_spectrum(100, 60, s).float()
    exact = torch.linalg.svdvals(w.double())

    def smallest_values():
        f = factorize(w, 4, "smallest", make_generator(0), "band")
        assert (f.w_frozen + f.a @ f.b - w).norm() / w.norm() < 1e-6
        return (f.a.norm(dim=0) * f.b.norm(dim=1)).double().sort(descending=True).values

    assert ((smallest_values() - exact[-4:]) / exact[-4:]).abs().max() < bound
    monkeypatch.setattr(fz, "gram64", fz.gram_lower)  # fp32 in its place: the test must be able to fail
    assert ((smallest_values() - exact[-4:]) / exact[-4:]).abs().max() > 1e-1


def test_random_draws_go_to_fp64_only_when_one_lands_in_the_tail(small_band, monkeypatch):
    """The fp32 reduction serves draws above the tail; a draw inside it repeats the work in fp64."""
    s = torch.logspace(0, -5, 60, dtype=torch.float64)  # S_i < 3.2% S_0 for the last ~42%
    w = _with_spectrum(100, 60, s, seed=3).float()
    exact = torch.linalg.svdvals(w.double())
    calls = []
    monkeypatch.setattr(fz, "gram64", lambda x: calls.append(1) or fz.gram_lower(x.double()))
    tail = exact < exact[0] * fz.GRAM_TAIL ** 0.5
    for seed in range(12):
        idx = draw_indices(60, 3, "random", make_generator(seed))
        calls.clear()
        f = factorize(w, 3, "random", make_generator(seed), "band")
        assert len(calls) == int(bool(tail[idx].any()))
        values = (f.a.norm(dim=0) * f.b.norm(dim=1)).double().sort(descending=True).values
        assert ((values - exact[idx]) / exact[idx]).abs().max() < 1e-2


def test_band_solver_is_deterministic_and_falls_back_when_iteration_fails(small_band, monkeypatch):
    """Two calls give the same bits (a resumed run redraws the same factors); a vector that does not
    converge sends the matrix to the one-stage ``tridiag`` path, which then gives its own result."""
    w = _with_spectrum(80, 50, torch.linspace(3.0, 1.0, 50, dtype=torch.float64)).float()
    first, second = (factorize(w, 4, "random", make_generator(7), "band") for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setattr(band, "TOL", 0.0)  # no residual is small enough
    fallback = factorize(w, 4, "random", make_generator(7), "band")
    reference = factorize(w, 4, "random", make_generator(7), "tridiag")
    assert all(torch.equal(a, b) for a, b in zip(fallback, reference))


def test_band_dispatch(monkeypatch):
    """Below ``BAND_MIN``, on an accelerator or without the routines, ``band`` is ``tridiag`` exactly
    (and ``gram`` where SciPy cannot serve the tensor)."""
    assert not band.available("cuda") and not band.available(torch.device("meta"))
    w = _with_spectrum(40, 30, torch.linspace(4.0, 1.0, 30, dtype=torch.float64)).float()
    by = {solver: factorize(w, 3, "random", make_generator(1), solver) for solver in ("band", "tridiag")}
    assert all(torch.equal(by["band"][i], by["tridiag"][i]) for i in range(3))
    monkeypatch.setattr(fz, "BAND_MIN", 1)
    monkeypatch.setattr(band, "_routines", lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(factorize(w, 3, "random", make_generator(1), "band"), by["tridiag"]))
