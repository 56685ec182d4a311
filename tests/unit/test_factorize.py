import pytest
import torch

from rosa_ds.config import RosaConfig
from rosa_ds.factorize import factorize, layer_seed, make_generator, new_factors, select_indices


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
