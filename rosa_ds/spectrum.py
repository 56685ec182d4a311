"""How many directions an accumulated update spans: the spectrum of ΔW = W_end − W_start.

ROSA's claim is that merging and redrawing the subspace lets the total update span far more than
R directions, while LoRA's update has rank ≤ R by construction. Two measures of the rank of ΔW
(m × n, singular values σ_1 ≥ … ≥ σ_k, k = min(m, n)):

- numerical rank at a relative threshold τ (default 1%): #{i : σ_i > τ·σ_1};
- entropy effective rank (Roy & Vetterli, 2007): exp(H(p)), p_i = σ_i / Σ_j σ_j, which is k for a
  flat spectrum and 1 for a rank-one update, without a threshold to choose.

Pure tensors (no DeepSpeed): the caller hands two state dicts of the same plain model.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch

from .errors import ConfigError

REL_THRESHOLD = 0.01


@dataclass(frozen=True)
class UpdateRank:
    """Rank measures of one ΔW (``norm``: its Frobenius norm; ``size``: min(m, n))."""

    numerical_rank: int
    effective_rank: float
    norm: float
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


def numerical_rank(s: torch.Tensor, rel: float = REL_THRESHOLD) -> int:
    """Singular values above ``rel`` times the largest (0 for a zero matrix)."""
    top = float(s.max()) if s.numel() else 0.0
    return int((s > rel * top).sum()) if top > 0 else 0


def effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of the normalised singular values (1.0 for a zero matrix)."""
    total = float(s.sum())
    if total <= 0:
        return 1.0
    p = (s.double() / total).clamp_min(1e-300)
    return math.exp(float(-(p * p.log()).sum()))


def update_rank(w_start: torch.Tensor, w_end: torch.Tensor, rel: float = REL_THRESHOLD) -> UpdateRank:
    """Rank measures of ``w_end − w_start`` (both m × n), computed in fp64."""
    if w_start.shape != w_end.shape or w_start.dim() != 2:
        raise ConfigError(f"update_rank needs two matrices of one shape, got {tuple(w_start.shape)} and "
                          f"{tuple(w_end.shape)}")
    delta = w_end.double() - w_start.double()
    s = torch.linalg.svdvals(delta)
    return UpdateRank(numerical_rank(s, rel), effective_rank(s), float(delta.norm()), min(delta.shape))


def layer_type(name: str) -> str:
    """The module kind a weight belongs to (``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else parts[-1]


def update_ranks(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                 names: Iterable[str], rel: float = REL_THRESHOLD) -> dict[str, UpdateRank]:
    """``update_rank`` of each named 2-D weight present in both state dicts."""
    return {n: update_rank(start[n], end[n], rel) for n in names if n in start and n in end and end[n].dim() == 2}


def summarize(ranks: Mapping[str, UpdateRank]) -> dict[str, dict]:
    """Per layer type: matrices, mean numerical and effective rank, mean ``size`` (the ceiling)."""
    groups: dict[str, list[UpdateRank]] = defaultdict(list)
    for name, r in ranks.items():
        groups[layer_type(name)].append(r)
    return {kind: {"matrices": len(rs), "numerical_rank": sum(r.numerical_rank for r in rs) / len(rs),
                   "effective_rank": sum(r.effective_rank for r in rs) / len(rs),
                   "size": sum(r.size for r in rs) / len(rs)}
            for kind, rs in sorted(groups.items())}
