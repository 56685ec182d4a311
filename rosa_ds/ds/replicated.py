"""The resample when every rank holds all of W_f: ZeRO-1/2 (and a quantized base's host master).

1. All ranks fetch the full fp32 A, B of every layer (small: R (m + n) per layer; one all-reduce
   for all of them, ``full_fp32_many``).
2. Each owner merges W = W_f + A B (fp64, rounded once) and runs the SVDs of its layers back to
   back: no collective in between, so ranks wait only for the imbalance of the owner assignment.
3. The owners' new A', B' are broadcast, one packed broadcast per owner: R (m + n) values per
   layer instead of the dense m n of W_f, rho = m n / (R (m + n)) times less (43x for
   SmolLM2-135M at R = 8).
4. W_f' = W_f + A B - A' B' everywhere:
   * fp32 W_f (and a quantized base, whose fp32 master is replicated): every rank computes it
     itself (``frozen_update``: fp64, rounded once, the same bits everywhere);
   * bf16 / fp16 W_f with fp32 masters (``RosaConfig.frozen_master``): the owner holds the layer's
     fp32 master, updates it (master' = master + A B - A' B') and broadcasts master' rounded once to
     the module dtype, packed per owner in bounded packs; no rank ever rounds a rounded W_f again.
A non-finite merged W found by an owner is agreed by all ranks before anything is written.
"""
from __future__ import annotations

import torch

from ..config import RosaConfig
from ..factorize import frozen_update, merge_weight, new_factors
from ..layer import RosaLinear
from ..owners import assign_owners
from .dist import device
from .exchange import (
    Clock,
    broadcast_factors,
    broadcast_frozen,
    frozen_packs,
    owned_by,
    raise_if_flagged,
    write_factors,
)
from .params import full_fp32_many


def resample_replicated(named: list[tuple[str, RosaLinear]], config: RosaConfig, resample_index: int,
                        rank: int, world: int, mastered: bool) -> dict:
    layers = [l for _, l in named]
    owners = assign_owners(layers, world)
    clock = Clock()
    with clock("gather_s"):
        values = full_fp32_many([p for l in layers for p in (l.rosa_A, l.rosa_B)])
        old = {l.layer_index: (values[2 * k], values[2 * k + 1]) for k, l in enumerate(layers)}
    new, masters = {}, {}
    bad = torch.zeros(len(layers), dtype=torch.int32, device=device())
    with clock("svd_s"):
        for k, layer in enumerate(layers):
            i = layer.layer_index
            if owners[i] != rank:
                continue
            base = layer.frozen_weight().detach()  # the fp32 master where this rank holds one
            # fp64, rounded once: the same SVD input as the ZeRO-3 path and the pure method
            w = merge_weight(base, *old[i])
            if not torch.isfinite(w).all():
                bad[k] = 1
                continue
            f = new_factors(w, config, resample_index, i, frozen=False)  # W_f' from frozen_update
            new[i] = (f.a, f.b)
            if mastered:  # host RAM until written: the owner's share of the masters, not device memory
                masters[i] = frozen_update(base, *old[i], f.a, f.b).cpu()
    with clock("exchange_s"):  # waits for the other owners' SVDs to finish
        raise_if_flagged([n for n, _ in named], bad, "merged weights")
        new = broadcast_factors(new, layers, owners, world)
    with clock("write_s"):
        if mastered:
            _write_from_owners(layers, owners, world, rank, new, masters)
        else:
            for layer in layers:
                a, b = new.pop(layer.layer_index)
                layer.write_frozen(frozen_update(layer.frozen_weight().detach(), *old.pop(layer.layer_index), a, b))
                write_factors(layer, a, b)
    return {"layers": len(layers), "svds_here": sum(owners[l.layer_index] == rank for l in layers), **clock.totals}


def _write_from_owners(layers: list[RosaLinear], owners: dict[int, int], world: int, rank: int,
                       new: dict[int, tuple[torch.Tensor, torch.Tensor]], masters: dict[int, torch.Tensor]) -> None:
    """Mastered W_f: each owner's master' rounded once to the module dtype, broadcast in packs and
    written everywhere as it arrives (bounded memory); the owner keeps master' itself."""
    dtype = layers[0].base_layer.weight.dtype
    for src in range(world):
        for pack in frozen_packs(owned_by(layers, owners, src), dtype):
            received = broadcast_frozen(pack, src, masters if rank == src else {}, dtype)
            for layer in pack:
                i = layer.layer_index
                if rank == src:
                    layer.set_master(masters.pop(i))  # the module gets master' rounded: the broadcast bits
                else:
                    layer.write_frozen(received[i])
                write_factors(layer, *new.pop(i))
