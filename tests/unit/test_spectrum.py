"""ΔW rank measures against matrices of known rank and spectrum."""
import math

import pytest
import torch

from rosa_ds.spectrum import effective_rank, layer_type, numerical_rank, summarize, update_rank, update_ranks


def low_rank(m: int, n: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(sigmas), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sigmas), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("r", [1, 3, 8])
def test_constructed_rank_is_recovered(r):
    w0 = torch.randn(40, 24, dtype=torch.float64)
    got = update_rank(w0, w0 + low_rank(40, 24, [1.0] * r))
    assert got.numerical_rank == r and got.effective_rank == pytest.approx(r, rel=1e-9)
    assert got.norm == pytest.approx(math.sqrt(r)) and got.size == 24


def test_threshold_and_entropy_on_a_known_spectrum():
    s = torch.tensor([10.0, 5.0, 0.2, 0.05, 0.0])
    assert numerical_rank(s) == 3 and numerical_rank(s, rel=0.5) == 1
    p = s[:4] / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert numerical_rank(torch.zeros(3)) == 0 and effective_rank(torch.zeros(3)) == 1.0


def test_fp32_weights_are_differenced_in_fp64():
    """A rank-2 update of 1e-4 on weights of size ~1 survives: the difference is taken in fp64."""
    w0 = torch.randn(64, 32)
    w1 = (w0.double() + low_rank(64, 32, [1e-2, 1e-2])).float()
    assert update_rank(w0, w1).numerical_rank == 2


def test_per_layer_type_summary():
    kinds = ("q_proj", "v_proj")
    start = {f"model.layers.{i}.self_attn.{k}.weight": torch.zeros(8, 8) for i in range(2) for k in kinds}
    end = {n: (low_rank(8, 8, [1.0] * (2 if "q_proj" in n else 4)).float()) for n in start}
    out = summarize(update_ranks(start, end, start))
    assert out == {"q_proj": {"matrices": 2, "numerical_rank": 2.0, "effective_rank": pytest.approx(2.0), "size": 8.0},
                   "v_proj": {"matrices": 2, "numerical_rank": 4.0, "effective_rank": pytest.approx(4.0), "size": 8.0}}
    assert layer_type("lm_head.weight") == "lm_head"
    with pytest.raises(ValueError, match="one shape"):
        update_rank(torch.zeros(2, 3), torch.zeros(3, 2))
