import pytest
import torch

import rosa_ds.factorize as fz
from rosa_ds import band, tridiag
from rosa_ds.config import RosaConfig
from rosa_ds.factorize import factorize, layer_seed, make_generator, new_factors, select_indices

needs_scipy = pytest.mark.skipif(not tridiag.available("cpu"), reason="the tridiag solver needs scipy and "
                                 "threadpoolctl (requirements.txt)")


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (16, 16)])
@pytest.mark.parametrize("strategy", ["random", "smallest", "largest"])
def test_factorize_reconstructs_and_has_shapes(shape, strategy, rel):
    w = torch.randn(*shape)
    f = factorize(w, 3, strategy, make_generator(0))
    m, n = shape
    assert f.w_frozen.shape == (m, n) and f.a.shape == (m, 3) and f.b.shape == (3, n)
    assert rel(f.w_frozen + f.a @ f.b, w) < 1e-6


def test_factors_are_the_selected_singular_triplets(rel):
    torch.manual_seed(0)
    w = torch.randn(10, 7, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for strategy, expected in (("largest", [0, 1]), ("smallest", [5, 6])):
        f = factorize(w, 2, strategy, make_generator(0))
        assert rel(f.a @ f.b, u[:, expected] @ torch.diag(s[expected]) @ vh[expected]) < 1e-10
        # the frozen part keeps exactly the other singular values
        s_frozen = torch.linalg.svdvals(f.w_frozen)[:5]
        rest = [i for i in range(7) if i not in expected]
        assert torch.allclose(s_frozen, s[rest], atol=1e-10)


@pytest.mark.parametrize("shape", [(10, 7), (7, 10)])
def test_uniform_factor_scale_moves_the_singular_value_into_b_and_keeps_the_product(shape, rel):
    """A_i = u_i c, B_i = (s_i / c) v_i^T, c^2 the mean drawn s_i: the same A B and W_f as the
    paper's sqrt split (only the factors' norms differ), tall and wide."""
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    paper = factorize(w, 3, "random", make_generator(1))
    ours = factorize(w, 3, "random", make_generator(1), scale="uniform")
    assert rel(ours.a @ ours.b, paper.a @ paper.b) < 1e-12 and rel(ours.w_frozen, paper.w_frozen) < 1e-12
    drawn = s[select_indices(s, 3, "random", make_generator(1))]
    c = drawn.mean().sqrt()
    assert torch.allclose(ours.a.norm(dim=0), c.expand(3), rtol=1e-10)
    assert torch.allclose(ours.b.norm(dim=1), drawn / c, rtol=1e-10)
    assert torch.allclose(paper.a.norm(dim=0), drawn.sqrt(), rtol=1e-10)
    assert new_factors(w, RosaConfig(rank=3, factor_scale="uniform"), 0, 0).a.norm(dim=0).std() < 1e-10
    with pytest.raises(ValueError, match="factor_scale"):
        RosaConfig(factor_scale="log")


def test_select_indices_smallest_largest():
    s = torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0])
    assert select_indices(s, 2, "largest").tolist() == [0, 1]
    assert select_indices(s, 2, "smallest").tolist() == [3, 4]


def test_random_is_seeded_reproducible_and_covers_all_indices():
    s = torch.linspace(10, 1, 32)
    draws = [select_indices(s, 4, "random", make_generator(seed)) for seed in range(200)]
    again = [select_indices(s, 4, "random", make_generator(seed)) for seed in range(200)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    assert len({tuple(d.tolist()) for d in draws}) > 150  # seeds give different draws
    counts = torch.bincount(torch.cat(draws), minlength=32)
    assert (counts > 0).all(), "every index must be drawable, the ends of the spectrum included"
    # uniform: each index expected 200*4/32 = 25 times
    assert counts.min() >= 8 and counts.max() <= 50


def test_layer_seed_separates_layers_and_resamples():
    seeds = {layer_seed(0, r, l) for r in range(5) for l in range(5)}
    assert len(seeds) == 25
    assert layer_seed(1, 0, 0) != layer_seed(0, 0, 0)


def test_svd_runs_in_fp32_for_bf16_weights(rel):
    w = torch.randn(16, 12).to(torch.bfloat16)
    f = new_factors(w, RosaConfig(rank=2), 0, 0)
    assert f.a.dtype == torch.float32
    assert rel(f.w_frozen + f.a @ f.b, w.float()) < 1e-6


def test_lora_init_has_zero_product():
    w = torch.randn(6, 5)
    f = new_factors(w, RosaConfig(rank=2, init="lora"), 0, 0)
    assert torch.equal(f.w_frozen, w) and torch.count_nonzero(f.b) == 0 and torch.count_nonzero(f.a) > 0


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An m x n fp64 matrix with singular values ``s`` (descending) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(s) @ v.t()


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])
@pytest.mark.parametrize("strategy", ["random", "smallest", "largest"])
def test_gram_solver_gives_the_svd_triplets(shape, strategy, rel):
    """Well-separated spectrum in fp32: the Gram solver's A B is the SVD's U_I S_I V_I^T."""
    k = min(shape)
    w = _with_spectrum(*shape, torch.linspace(10.0, 1.0, k, dtype=torch.float64)).float()
    by = {solver: factorize(w, 3, strategy, make_generator(5), solver) for solver in ("gram", "svd")}
    assert rel(by["gram"].a @ by["gram"].b, by["svd"].a @ by["svd"].b) < 1e-4
    for f in by.values():
        assert rel(f.w_frozen + f.a @ f.b, w) < 1e-6
        # balanced split: |A e_i| = |B^T e_i| = sqrt(s_i), as U sqrt(S) and sqrt(S) V^T are
        assert torch.allclose(f.a.norm(dim=0), f.b.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("solver", ["gram", pytest.param("tridiag", marks=needs_scipy)])
@pytest.mark.parametrize("cond, bound", [(1e5, 3e-3), (7e5, 6e-2)])
def test_gram_solvers_refine_the_small_singular_values(solver, cond, bound, rel, monkeypatch):
    """Condition numbers 1e5 and 7e5 (SmolLM2's q_proj) in fp32: S_i^2 of the tail is far below G's
    rounding (eps_32 |G|), so unrefined Gram eigenvectors of the ``smallest`` triplets are noise;
    the fp64 Rayleigh-Ritz step recovers the true values (and the test fails without it). The bound
    is the one the fp32 Gram matrix allows both solvers (fp32 ``svd`` gets ~1e-3 at 7e5)."""
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 40, dtype=torch.float64)
    w = _with_spectrum(64, 40, s).float()
    exact = torch.linalg.svdvals(w.double())

    def smallest_values(f):  # s_i of the chosen directions, recovered from the balanced split
        return (f.a.norm(dim=0) * f.b.norm(dim=1)).double().sort(descending=True).values

    f = factorize(w, 4, "smallest", make_generator(0), solver)
    assert rel(f.w_frozen + f.a @ f.b, w) < 1e-6
    assert ((smallest_values(f) - exact[-4:]) / exact[-4:]).abs().max() < bound
    monkeypatch.setattr(fz, "GRAM_TAIL", 0.0)  # no refinement: the test must be able to fail
    f = factorize(w, 4, "smallest", make_generator(0), solver)
    assert rel(smallest_values(f), exact[-4:]) > 1e-1


def test_gram_solver_keeps_zero_directions_finite():
    w = torch.zeros(6, 4)
    w[0, 0] = 2.0  # rank 1: three zero singular values
    f = factorize(w, 3, "smallest", make_generator(0), "gram")
    assert all(torch.isfinite(t).all() for t in f)
    assert torch.allclose(f.w_frozen + f.a @ f.b, w)


def test_solver_names_and_validation():
    with pytest.raises(ValueError, match="solver 'qr' does not exist; choose one of band, tridiag, gram, svd"):
        RosaConfig(solver="qr")
    assert RosaConfig().solver == "band" and RosaConfig(solver="svd").to_dict()["solver"] == "svd"


@needs_scipy
@pytest.mark.parametrize("solver", ["tridiag", "band"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])
@pytest.mark.parametrize("strategy", ["random", "smallest", "largest"])
def test_drawn_pair_solvers_give_the_svd_triplets(solver, dtype, tol, shape, strategy, rel, monkeypatch):
    """Known, well-separated spectrum: the tridiag and band solvers' A B is torch.linalg.svd's
    U_I S_I V_I^T at the indices the draw gives (the draw is the gram solver's: same seed, same
    indices). ``band`` is forced below the size it pays at (``BAND_MIN``), as it is on small matrices."""
    if solver == "band" and not band.available("cpu"):
        pytest.skip("the band solver needs SciPy's LAPACK with the two-stage routines")
    monkeypatch.setattr(fz, "BAND_MIN", 1)
    k = min(shape)
    w = _with_spectrum(*shape, torch.linspace(10.0, 1.0, k, dtype=torch.float64)).to(dtype)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    idx = select_indices(s, 3, strategy, make_generator(5))
    f = factorize(w, 3, strategy, make_generator(5), solver)
    assert rel(f.a @ f.b, u[:, idx] @ torch.diag(s[idx]) @ vh[idx]) < tol
    assert rel(f.w_frozen + f.a @ f.b, w) < (1e-14 if dtype == torch.float64 else 1e-6)
    assert torch.allclose(f.a.norm(dim=0), f.b.norm(dim=1), rtol=1e-4)


@needs_scipy
def test_tridiag_solver_with_a_refined_tail_among_random_draws(rel):
    """A heavy tail (cond 7e5) and R = 12 of 40 random indices, so some draws fall in the refined
    tail and some above it: every triplet is X's singular triplet at its index (values checked
    against the fp64 SVD), and the split stays exact."""
    s = torch.logspace(0, -torch.log10(torch.tensor(7e5)).item(), 40, dtype=torch.float64)
    w = _with_spectrum(64, 40, s, seed=3).float()
    exact = torch.linalg.svdvals(w.double())
    idx = select_indices(exact, 12, "random", make_generator(2))
    assert (s[idx] < s[0] * fz.GRAM_TAIL ** 0.5).any() and (s[idx] > s[0] * fz.GRAM_TAIL ** 0.5).any()
    f = factorize(w, 12, "random", make_generator(2), "tridiag")
    values = (f.a.norm(dim=0) * f.b.norm(dim=1)).double()
    assert ((values - exact[idx]) / exact[idx]).abs().max() < 6e-2
    assert rel(f.w_frozen + f.a @ f.b, w) < 1e-6


@needs_scipy
@pytest.mark.parametrize("wanted", [[0, 3, 17, 39], list(range(12)), [*range(20), 25, 39], list(range(40))])
def test_tridiag_eigenpairs_match_eigh(wanted, monkeypatch):
    """rosa_ds.tridiag against torch.linalg.eigh on G = X^T X (fp64): scattered indices (bisection +
    inverse iteration), a run (MRRR) and most of the spectrum (divide and conquer)."""
    x = _with_spectrum(64, 40, torch.logspace(0, -2, 40, dtype=torch.float64))
    g = x.t() @ x
    lam, v = torch.linalg.eigh(g)
    tri = tridiag.reduce(torch.tril(g))  # only the lower triangle is read
    assert torch.allclose(torch.from_numpy(tri.values), lam, rtol=0, atol=1e-12)
    got = tridiag.vectors(tri, wanted)
    assert torch.allclose((got.t() @ v[:, wanted]).abs(), torch.eye(len(wanted), dtype=got.dtype), atol=1e-8)


@needs_scipy
def test_gram_lower_blocks(monkeypatch):
    x = torch.randn(30, 20, dtype=torch.float64)
    monkeypatch.setattr(fz, "GRAM_BLOCK", 3)  # 4 column blocks of 5
    g = fz.gram_lower(x)
    assert torch.allclose(torch.tril(g), torch.tril(x.t() @ x)) and torch.count_nonzero(torch.triu(g, 5)) == 0


def test_tridiag_dispatch_keeps_scipy_off_accelerators(monkeypatch):
    """Only CPU tensors reach SciPy: on any other device (and without SciPy) ``tridiag`` takes the
    torch-only ``gram`` path, with the same drawn indices."""
    assert not tridiag.available(torch.device("meta")) and not tridiag.available("cuda")

    def refuse(*args):
        raise AssertionError("SciPy's LAPACK called for a tensor it must not see")

    monkeypatch.setattr(tridiag, "reduce", refuse)
    monkeypatch.setattr(tridiag, "available", lambda device: False)  # what an accelerator tensor gets
    w = _with_spectrum(24, 16, torch.linspace(4.0, 1.0, 16, dtype=torch.float64)).float()
    by = {solver: factorize(w, 3, "random", make_generator(1), solver) for solver in ("tridiag", "gram")}
    assert all(torch.equal(by["tridiag"][i], by["gram"][i]) for i in range(3))
