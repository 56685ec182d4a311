"""What the owners of a resample send to every rank, and the per-phase clock of a resample.

Every collective here runs on tensors made on ``device()`` (NCCL needs them on the accelerator)
and packs many layers into one collective: a few hundred small collectives cost ~0.6 s on two CPU
ranks over gloo, where one packed collective per owner costs a few milliseconds.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from ..layer import RosaLinear
from .dist import all_reduce, broadcast, device, rank_and_world, synchronize
from .params import set_fp32_master

NONFINITE_FIX = "lower the learning rate, enable gradient clipping, or resume from an earlier checkpoint"
# The new W_f of an owner's layers travels in packs of at most this many bytes (bounded buffers).
FROZEN_PACK_BYTES = 1 << 28


class Clock:
    """Wall seconds per phase of a resample on this rank (reported in the resample event); the
    accelerator is synchronized before each reading, so queued GPU work is counted where it ran."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        self.totals[name] = round(self.totals.get(name, 0.0) + time.perf_counter() - start, 4)


def raise_if_flagged(names: list[str], flags: torch.Tensor, what: str) -> None:
    """Raise on every rank if any rank flagged a layer. ``flags`` (int32 on ``device()``) is summed
    over ranks first: an error on one rank alone would leave the others waiting in a collective."""
    all_reduce(flags)
    bad = [n for n, flag in zip(names, flags.tolist()) if flag]
    if bad:
        raise FloatingPointError(f"ROSA layers with non-finite {what}: {', '.join(bad)}; refusing to merge "
                                 f"({NONFINITE_FIX})")


def owned_by(layers: list[RosaLinear], owners: dict[int, int], src: int) -> list[RosaLinear]:
    return [l for l in layers if owners[l.layer_index] == src]


def broadcast_factors(new: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: list[RosaLinear],
                      owners: dict[int, int], world: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every owner's new fp32 (A', B') on every rank: one packed broadcast per owner."""
    rank, _ = rank_and_world()
    dev, out = device(), {}
    for src in range(world):
        mine = owned_by(layers, owners, src)
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


def frozen_packs(layers: list[RosaLinear], dtype: torch.dtype) -> list[list[RosaLinear]]:
    """``layers`` cut into consecutive packs of at most ``FROZEN_PACK_BYTES`` of W_f in ``dtype``
    (a layer larger than that travels alone)."""
    packs, current, size = [], [], 0
    item = dtype.itemsize
    for l in layers:
        nbytes = l.out_features * l.in_features * item
        if current and size + nbytes > FROZEN_PACK_BYTES:
            packs.append(current)
            current, size = [], 0
        current.append(l)
        size += nbytes
    return packs + ([current] if current else [])


def broadcast_frozen(pack: list[RosaLinear], src: int, values: dict[int, torch.Tensor],
                     dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """One pack of an owner's new W_f (m, n) in the module's ``dtype``, on every rank. ``values``:
    the owner's fp32 W_f' per layer index (host or device); others pass ``{}``."""
    rank, _ = rank_and_world()
    dev = device()
    sizes = [l.out_features * l.in_features for l in pack]
    if rank == src:
        flat = torch.cat([values[l.layer_index].to(dev).to(dtype).flatten() for l in pack])
    else:
        flat = torch.empty(sum(sizes), dtype=dtype, device=dev)
    broadcast(flat, src=src)
    return {l.layer_index: part.view(l.out_features, l.in_features) for l, part in zip(pack, flat.split(sizes))}


def write_factors(layer: RosaLinear, a: torch.Tensor, b: torch.Tensor) -> None:
    """A', B' into the module parameters and into this rank's slice of their fp32 masters."""
    layer.write_factors(a, b)
    set_fp32_master(layer.rosa_A, a)
    set_fp32_master(layer.rosa_B, b)
