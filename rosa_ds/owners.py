"""Which rank factorizes which layer: pure arithmetic, identical on every rank (no DeepSpeed).

A layer's SVD cost is ~ m n min(m, n) flops; owners are assigned by greedy longest-processing-
time first, which is within 4/3 of the optimal makespan (Graham 1969), and deterministic: ties
are broken by layer index and rank, so every rank computes the same answer without talking.
Works on anything with ``layer_index``, ``out_features`` and ``in_features`` (``RosaLinear``).
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol


class Shaped(Protocol):
    layer_index: int
    out_features: int
    in_features: int


def svd_cost(layer: Shaped) -> int:
    m, n = layer.out_features, layer.in_features
    return m * n * min(m, n)


def assign_owners(layers: Sequence[Shaped], world_size: int) -> dict[int, int]:
    """layer_index -> owner rank: greedy longest-processing-time balance of SVD cost."""
    load = [(0, r) for r in range(world_size)]
    owners: dict[int, int] = {}
    for layer in sorted(layers, key=lambda l: (-svd_cost(l), l.layer_index)):
        cost, rank = heapq.heappop(load)
        owners[layer.layer_index] = rank
        heapq.heappush(load, (cost + svd_cost(layer), rank))
    return owners


def rounds(layers: Sequence[Shaped], owners: dict[int, int], world_size: int) -> list[list]:
    """Rounds of at most one layer per owner, so owners compute their SVDs concurrently."""
    per_rank = [[l for l in layers if owners[l.layer_index] == r] for r in range(world_size)]
    depth = max((len(p) for p in per_rank), default=0)
    return [[p[k] for p in per_rank if k < len(p)] for k in range(depth)]
