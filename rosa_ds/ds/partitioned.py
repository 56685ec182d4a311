"""The resample when W_f is partitioned (ZeRO-3): rounds of at most one layer per owner.

In each round all ranks gather the round's layers one at a time (collective), the owners run
their SVDs concurrently, then each owner writes the full new W_f inside
``GatheredParameters(modifier_rank=owner)`` (DeepSpeed re-partitions it) and broadcasts A', B'
so that every rank can write its slice of their fp32 masters. With fp32 masters of a bf16 / fp16
W_f (``RosaConfig.frozen_master``), the owner merges from its master instead of the gathered W_f
(after the initial factorization no W_f is gathered to read it) and writes the master rounded once.
"""
from __future__ import annotations

import torch

from ..config import RosaConfig
from ..factorize import Factors, frozen_part, merge_weight, new_factors
from ..layer import RosaLinear
from ..owners import assign_owners, rounds
from .dist import broadcast, device, rank_and_world
from .exchange import Clock
from .params import full_fp32, gathered, is_zero3, set_fp32_master


def merged_on_owner(layer: RosaLinear, is_owner: bool, read_module: bool = True) -> torch.Tensor | None:
    """W = W_f + A B (fp64, rounded once to fp32) from the fp32 masters of A, B. Collective.

    Returned on the owner, and on every rank when W_f is replicated (a quantized base's host
    master): those ranks re-quantize W_f from it (see ``write_everywhere``). ``read_module=False``:
    the owner merges from its fp32 master of W_f, and the partitioned W_f is not gathered."""
    a, b = full_fp32(layer.rosa_A), full_fp32(layer.rosa_B)
    with gathered(layer.frozen_params() if read_module else []):  # none for a quantized base
        if not is_owner and any(is_zero3(p) for p in layer.frozen_params()):
            return None
        if not read_module and not layer.has_master:
            raise RuntimeError(f"rosa_ds bug: layer {layer.layer_index} has no fp32 master of W_f on its owner")
        return merge_weight(layer.frozen_weight().detach(), a, b)


def write_everywhere(layer: RosaLinear, factors: Factors | None, src: int, merged: torch.Tensor | None = None,
                     send: bool = True, mastered: bool = False) -> None:
    """Make the owner's new (W_f, A, B) the value on every rank: module params and fp32 masters.

    Only A and B travel. Under ZeRO-3 the owner writes the full W_f inside GatheredParameters and
    DeepSpeed re-partitions it; a quantized base (host master, replicated buffers) is recomputed
    by every other rank from its own ``merged`` W. ``send=False``: every rank already holds the
    same ``factors`` (it computed them itself; the benchmarks' every-rank scheme).
    """
    rank, _ = rank_and_world()
    m, n, r = layer.out_features, layer.in_features, layer.rank
    dev = device()
    if factors is None:
        factors = Factors(None, torch.empty(m, r, device=dev), torch.empty(r, n, device=dev))
    a, b = (t.to(dev).contiguous() for t in (factors.a, factors.b))
    if send:
        a, b = broadcast(a, src), broadcast(b, src)
    if not is_zero3(layer.rosa_A):
        layer.write(Factors(factors.w_frozen.to(dev), a, b))
    else:
        with gathered([*layer.frozen_params(), layer.rosa_A, layer.rosa_B], modifier_rank=src):
            if rank == src and mastered:
                layer.set_master(factors.w_frozen)  # the module gets the master rounded once
                layer.write_factors(a, b)
            elif rank == src:
                layer.write(Factors(factors.w_frozen.to(dev), a, b))
            elif layer.quantized:  # host master + replicated buffers: not DeepSpeed's, each rank writes its own
                layer.write_frozen(frozen_part(merged, a, b))
    set_fp32_master(layer.rosa_A, a)
    set_fp32_master(layer.rosa_B, b)


def resample_partitioned(layers: list[RosaLinear], config: RosaConfig, resample_index: int, rank: int,
                         world: int, mastered: bool) -> dict:
    owners = assign_owners(layers, world)
    read_module = not (mastered and resample_index > 0)  # masters exist once the first factorization ran
    svds, clock = 0, Clock()
    for group in rounds(layers, owners, world):
        merged = {}
        with clock("gather_s"):
            for layer in group:  # collective gathers, one layer at a time
                w = merged_on_owner(layer, owners[layer.layer_index] == rank, read_module)
                if w is not None:
                    merged[layer.layer_index] = w
        with clock("svd_s"):
            owned = [l.layer_index for l in group if owners[l.layer_index] == rank]
            mine = {i: new_factors(merged[i], config, resample_index, i) for i in owned}
        svds += len(mine)
        with clock("write_s"):  # includes waiting for the round's slowest SVD (the first broadcast)
            for layer in group:
                i = layer.layer_index
                write_everywhere(layer, mine.pop(i, None), owners[i], merged.pop(i, None), mastered=mastered)
    return {"layers": len(layers), "svds_here": svds, **clock.totals}


def resample_everywhere(layers: list[RosaLinear], config: RosaConfig, resample_index: int) -> dict[str, int]:
    """The benchmarks' naive scheme: every rank computes every layer's SVD itself (no masters)."""
    svds = 0
    for layer in layers:
        merged = merged_on_owner(layer, True)
        factors = new_factors(merged, config, resample_index, layer.layer_index)
        svds += 1
        # ZeRO-3 keeps a write from one rank only; every rank holds the same values anyway
        write_everywhere(layer, factors, src=0, merged=merged, send=False)
    return {"layers": len(layers), "svds_here": svds}
