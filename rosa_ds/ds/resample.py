"""The distributed resample: merge A B into W_f, draw new subspaces, write them on every rank.

What a resample must touch under ZeRO, per adapted layer (W_f frozen; A, B trainable): the module
parameters W_f, A, B (``copy_`` into them, never rebinding ``.data``), the fp32 masters of A and B
(``params.set_fp32_master``), and the factors' optimizer state (``optim.reset_factor_state``,
called by the engine afterwards).

Every layer has one owner rank (``owners.assign_owners``); its SVD runs exactly once in the
world, on the owner, and its subspace is drawn from a seed of (seed, resample index, layer index)
that every rank derives alone.

* ZeRO-1/2 (W_f replicated; ``_resample_replicated``): owners run their SVDs back to back, only
  the new A', B' are broadcast, and every rank computes W_f' = W_f + A B - A' B' itself (fp64,
  rounded once: the same bits everywhere).
* ZeRO-3 (W_f partitioned): rounds of at most one layer per rank: all ranks gather the round's
  merged weights (collective), owners run their SVDs concurrently, then write the full W_f inside
  ``GatheredParameters(modifier_rank=owner)`` and broadcast A', B' for the fp32 master slices.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ..config import RosaConfig
from ..factorize import Factors, frozen_part, frozen_update, new_factors
from ..inject import iter_rosa_layers
from ..layer import RosaLinear
from .dist import all_reduce, broadcast, device, rank_and_world
from .owners import assign_owners, rounds
from .params import full_fp32, full_fp32_many, gathered, is_zero3, set_fp32_master

NONFINITE_FIX = "lower the learning rate, enable gradient clipping, or resume from an earlier checkpoint"


class _Clock:
    """Wall seconds per phase of a resample on this rank (reported in the resample event)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.totals[name] = round(self.totals.get(name, 0.0) + time.perf_counter() - start, 4)


def _raise_if_flagged(names: list[str], flags: torch.Tensor, what: str) -> None:
    """Agreed by all ranks (an error on one rank alone would leave the others waiting in a
    collective forever): ``flags`` is summed over ranks first."""
    all_reduce(flags)
    bad = [n for n, flag in zip(names, flags.tolist()) if flag]
    if bad:
        raise FloatingPointError(f"ROSA layers with non-finite {what}: {', '.join(bad)}; refusing to merge "
                                 f"({NONFINITE_FIX})")


def check_finite_everywhere(named_layers: list[tuple[str, RosaLinear]], frozen: bool = True) -> None:
    """Raise on every rank, naming the layers, if any rank's slice of W_f, A or B is non-finite.
    Checked before anything is modified."""
    bad = torch.zeros(len(named_layers), dtype=torch.int32, device=device())
    for i, (_, layer) in enumerate(named_layers):
        for p in (*(layer.frozen_tensors() if frozen else ()), layer.rosa_A, layer.rosa_B):  # W_f or its master
            local = p.ds_tensor if is_zero3(p) else p
            if not torch.isfinite(local).all():
                bad[i] = 1
    _raise_if_flagged([n for n, _ in named_layers], bad, "weights or factors")


def merged_on_owner(layer: RosaLinear, is_owner: bool) -> torch.Tensor | None:
    """W = W_f + A B from the fp32 masters of A, B (product in fp64, rounded once to fp32).

    Collective. Returned on the owner, and on every rank when W_f is not partitioned (a quantized
    base's host master): those ranks re-quantize W_f from it (see ``write_everywhere``)."""
    a, b = full_fp32(layer.rosa_A), full_fp32(layer.rosa_B)
    with gathered(layer.frozen_params()):  # none for a quantized base: its master is replicated
        if not is_owner and any(is_zero3(p) for p in layer.frozen_params()):
            return None
        w = layer.frozen_weight().detach().double() + a.double() @ b.double()
        return w.float()


def _broadcast_owned(new: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: list[RosaLinear],
                     owners: dict[int, int], world: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every owner's new (A', B') on every rank: one broadcast per owner of all its layers' factors
    packed flat (world-size collectives instead of two per layer)."""
    rank, _ = rank_and_world()
    dev, out = device(), {}
    for src in range(world):
        mine = [l for l in layers if owners[l.layer_index] == src]
        if not mine:
            continue
        shapes = [((l.out_features, l.rank), (l.rank, l.in_features)) for l in mine]
        sizes = [m * r + r * n for (m, r), (_, n) in shapes]
        if rank == src:
            flat = torch.cat([t.to(dev, torch.float32).flatten() for l in mine for t in new[l.layer_index]])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
        broadcast(flat, src=src)
        for l, (a_shape, b_shape), part in zip(mine, shapes, flat.split(sizes)):
            a, b = part.split([a_shape[0] * a_shape[1], b_shape[0] * b_shape[1]])
            out[l.layer_index] = (a.view(a_shape), b.view(b_shape))
    return out


def write_everywhere(layer: RosaLinear, factors: Factors | None, src: int, merged: torch.Tensor | None = None,
                     send: bool = True) -> None:
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
    if is_zero3(layer.rosa_A):
        with gathered([*layer.frozen_params(), layer.rosa_A, layer.rosa_B], modifier_rank=src):
            if rank == src:
                layer.write(Factors(factors.w_frozen.to(dev), a, b))
            elif layer.quantized:  # host master + replicated buffers: not DeepSpeed's, each rank writes its own
                layer.write_frozen(frozen_part(merged, a, b))
    else:
        layer.write(Factors(factors.w_frozen.to(dev), a, b))
    set_fp32_master(layer.rosa_A, a)
    set_fp32_master(layer.rosa_B, b)


@torch.no_grad()
def distributed_resample(model: torch.nn.Module, config: RosaConfig, resample_index: int,
                         owner_svd: bool = True) -> dict[str, int]:
    """Merge and redraw every ROSA layer of ``model`` across ranks (see the module docstring).

    Works before ``deepspeed.initialize`` too (plain parameters): with A = B = 0 it is the
    initial factorization. The caller resets the optimizer state afterwards. Returns counts.
    ``owner_svd=False`` is the naive scheme the benchmarks compare against: every rank computes
    every layer's SVD itself (the same numbers, no broadcast; world-size times the SVD work).
    """
    rank, world = rank_and_world()
    named = list(iter_rosa_layers(model))
    layers = [l for _, l in named]
    replicated = not any(is_zero3(l.rosa_A) for l in layers)
    # the replicated path checks each merged W on its owner (half the reads); factors are checked here
    check_finite_everywhere(named, frozen=not (owner_svd and replicated))
    if not owner_svd:
        return _resample_everywhere(layers, config, resample_index)
    if replicated:
        return _resample_replicated(named, config, resample_index, rank, world)
    return _resample_partitioned(layers, config, resample_index, rank, world)


def _resample_partitioned(layers: list[RosaLinear], config: RosaConfig, resample_index: int, rank: int,
                          world: int) -> dict:
    """ZeRO-3: rounds of at most one layer per owner (see the module docstring)."""
    owners = assign_owners(layers, world)
    svds, clock = 0, _Clock()
    for group in rounds(layers, owners, world):
        merged = {}
        with clock("gather_s"):
            for layer in group:  # collective gathers, one layer at a time
                w = merged_on_owner(layer, owners[layer.layer_index] == rank)
                if w is not None:
                    merged[layer.layer_index] = w
        with clock("svd_s"):
            owned = [l.layer_index for l in group if owners[l.layer_index] == rank]
            mine = {i: new_factors(merged[i], config, resample_index, i) for i in owned}
        svds += len(mine)
        with clock("write_s"):  # includes waiting for the round's slowest SVD (the first broadcast)
            for layer in group:
                i = layer.layer_index
                write_everywhere(layer, mine.pop(i, None), owners[i], merged.pop(i, None))
    return {"layers": len(layers), "svds_here": svds, **clock.totals}


def _resample_replicated(named: list[tuple[str, RosaLinear]], config: RosaConfig, resample_index: int,
                         rank: int, world: int) -> dict:
    """The resample when every rank holds all of W_f (ZeRO-0/1/2; a quantized base's host master).

    1. all ranks fetch the full fp32 A, B of every layer (small: R (m + n) per layer; one
       all-reduce for all of them, ``full_fp32_many``);
    2. each rank merges W = W_f + A B (fp64, rounded once) and runs the SVDs of the layers it
       owns, back to back: no collective in between, so ranks wait only for the total imbalance
       of the owner assignment, not for each round's slowest SVD;
    3. the owners' new A', B' are broadcast, one packed broadcast per owner: R (m + n) values per
       layer instead of the dense m n of W_f, rho = m n / (R (m + n)) times less (43x for
       SmolLM2-135M at R = 8);
    4. every rank computes W_f' = W_f + A B - A' B' (``frozen_update``: fp64, rounded once, the
       same bits everywhere) and writes W_f', A', B' and the fp32 masters.
    A non-finite merged W found by an owner is agreed by all ranks before anything is written.
    """
    layers = [l for _, l in named]
    owners = assign_owners(layers, world)
    clock = _Clock()
    with clock("gather_s"):
        values = full_fp32_many([p for l in layers for p in (l.rosa_A, l.rosa_B)])
        old = {l.layer_index: (values[2 * k], values[2 * k + 1]) for k, l in enumerate(layers)}
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bad = torch.zeros(len(layers), dtype=torch.int32, device=device())
    with clock("svd_s"):
        for k, layer in enumerate(layers):
            i = layer.layer_index
            if owners[i] != rank:
                continue
            a_old, b_old = old[i]
            # fp64, rounded once: the same SVD input as the ZeRO-3 path (merged_on_owner) and the pure method
            merged = torch.addmm(layer.frozen_weight().detach().double(), a_old.double(), b_old.double()).float()
            if not torch.isfinite(merged).all():
                bad[k] = 1
                continue
            f = new_factors(merged, config, resample_index, i, frozen=False)  # W_f' comes from frozen_update
            new[i] = (f.a, f.b)
    with clock("exchange_s"):  # waits for the other owners' SVDs to finish
        _raise_if_flagged([n for n, _ in named], bad, "merged weights")
        new = _broadcast_owned(new, layers, owners, world)
    with clock("write_s"):
        for layer in layers:
            i = layer.layer_index
            a, b = new.pop(i)
            w_f = frozen_update(layer.frozen_weight().detach(), *old.pop(i), a, b)
            layer.write(Factors(w_f, a, b))
            set_fp32_master(layer.rosa_A, a)
            set_fp32_master(layer.rosa_B, b)
    return {"layers": len(layers), "svds_here": sum(owners[l.layer_index] == rank for l in layers), **clock.totals}


def _resample_everywhere(layers: list[RosaLinear], config: RosaConfig, resample_index: int) -> dict[str, int]:
    svds = 0
    for layer in layers:
        merged = merged_on_owner(layer, True)
        factors = new_factors(merged, config, resample_index, layer.layer_index)
        svds += 1
        # ZeRO-3 keeps a write from one rank only; every rank holds the same values anyway
        write_everywhere(layer, factors, src=0, merged=merged, send=False)
    return {"layers": len(layers), "svds_here": svds}
