"""The DeepSpeed seam: the only module of rosa_ds that imports deepspeed.

What a resample must touch under ZeRO, per adapted layer (W_f frozen; A, B trainable):

* the module parameters W_f, A, B (``copy_`` into them: under ZeRO-1/2 A and B are views into
  a flat bf16/fp32 buffer; under ZeRO-3 each rank holds a 1/N slice, ``ds_tensor``, and a write
  persists only from ``GatheredParameters(modifier_rank=r)`` on rank r);
* the fp32 master copies of A and B (a slice of a flat fp32 partition per rank);
* the optimizer state of the flat groups that hold the factors: cleared, which zeroes the
  moments AND resets the step counter (bias correction restarts; keeping the step with zeroed
  moments makes the first update up to ~3x too large).

Coordination: every layer has one owner rank (greedy balance of SVD cost m n min(m, n)); its SVD
runs exactly once in the world, on the owner.

* ZeRO-1/2 (W_f replicated; ``_resample_replicated``): owners run their SVDs back to back, only
  the new A', B' are broadcast, and every rank computes W_f' = W_f + A B - A' B' itself (fp64,
  rounded once: the same bits everywhere).
* ZeRO-3 (W_f partitioned): rounds of at most one layer per rank: all ranks gather the round's
  merged weights (collective), owners run their SVDs concurrently, then write the full W_f inside
  ``GatheredParameters(modifier_rank=owner)`` and broadcast A', B' for the fp32 master slices.
"""
from __future__ import annotations

import contextlib
import heapq
import os
import time
from typing import Iterable, Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

from .config import RosaConfig
from .factorize import Factors, frozen_part, frozen_update, new_factors
from .inject import iter_rosa_layers
from .layer import RosaLinear


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Start the process group (NCCL on CUDA, gloo on the CPU accelerator) if the launcher did not.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at this point: a
    C++ build on every fresh machine, and a build killed halfway leaves a lock that hangs every
    later start. It only speeds up CPU all-reduce, so it is skipped unless ROSA_DS_CPU_SHM=1.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # a plain `python train.py`: a one-process group (DeepSpeed would try MPI discovery)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(port))})
    if get_accelerator().device_name() == "cpu" and os.environ.get("ROSA_DS_CPU_SHM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())


def shutdown_distributed() -> None:
    """Leave the process group cleanly once every rank is done (call last).

    Exiting with a live gloo group lets its C++ threads be destroyed during interpreter
    teardown, which intermittently aborts a finished rank ("terminate called without an active
    exception", exit -6) and turns a completed job into a failed launch."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ds_initialize(model, groups: list[dict], ds_config: dict, optimizer=None, lr_scheduler=None):
    """``deepspeed.initialize`` on rosa_ds's param groups; returns the DeepSpeedEngine."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                           optimizer=optimizer, lr_scheduler=lr_scheduler)
    return engine


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full ZeRO-3 parameters inside the block (a no-op for ZeRO-0/1/2 parameters).

    Collective: every rank must enter it with the same parameters.
    """
    z3 = [p for p in params if is_zero3(p)]
    if not z3:
        yield
        return
    with deepspeed.zero.GatheredParameters(z3, modifier_rank=modifier_rank):
        yield


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a parameter on every rank: the fp32 master where DeepSpeed keeps
    one (collective: all-reduce under ZeRO-1/2, all-gather under ZeRO-3), else the module value."""
    value = safe_get_full_fp32_param(param) if param.requires_grad else None
    if value is not None:
        return value.float()
    with gathered([param]):
        return param.detach().float().clone()


@torch.no_grad()
def full_fp32_many(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """``full_fp32`` of many parameters with one collective instead of one each.

    Under ZeRO-1/2 DeepSpeed assembles a parameter's fp32 value by all-reducing a zero buffer
    that holds this rank's fragment of its master (``get_full_hp_param``); here the buffers of all
    ``params`` are one flat buffer and one all-reduce (x + 0 = x: the same bits). 420 small
    all-reduces cost ~0.6 s on 2 CPU ranks over gloo. Falls back to one call per parameter when
    they are not all ZeRO-1/2 masters of one data-parallel group."""
    groups = {id(getattr(p, "_dp_group", None)) for p in params}
    if not params or len(groups) != 1 or not all(p.requires_grad and hasattr(p, "_hp_mapping") and not is_zero3(p)
                                                  for p in params):
        return [full_fp32(p) for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    for p, part in zip(params, flat.split(sizes)):
        if p._hp_mapping is not None:  # None: no fragment of this parameter in this rank's partition
            address = p._hp_mapping.lp_fragment_address
            part.narrow(0, address.start, address.numel).copy_(p._hp_mapping.get_hp_fragment().flatten())
    if dist.is_initialized():
        dist.all_reduce(flat, group=params[0]._dp_group)
    return [part.view_as(p) for p, part in zip(params, flat.split(sizes))]


def set_fp32_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write ``value`` (the full fp32 tensor, identical on every rank) into this rank's slice of
    the fp32 master. ZeRO-3 partitions the flattened parameter, padded to a multiple of the
    world size, into equal slices; ``safe_set_full_*`` would crash on a ragged numel."""
    if is_zero3(param):
        part = param.ds_tensor.numel()
        rank = dist.get_rank(group=param.ds_process_group)
        flat = torch.zeros(part * dist.get_world_size(group=param.ds_process_group), dtype=torch.float32,
                           device=value.device)
        flat[: value.numel()] = value.flatten()
        safe_set_local_fp32_param(param, flat[rank * part:(rank + 1) * part])
    elif hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value.float())


# --- owners and rounds ----------------------------------------------------------------------
def assign_owners(layers: list[RosaLinear], world_size: int) -> dict[int, int]:
    """layer_index -> owner rank: greedy longest-processing-time balance of SVD cost.

    Deterministic (same answer on every rank): ties broken by layer index and rank.
    """
    load = [(0, r) for r in range(world_size)]
    owners: dict[int, int] = {}
    by_cost = sorted(layers, key=lambda l: (-l.out_features * l.in_features * min(l.out_features, l.in_features),
                                            l.layer_index))
    for layer in by_cost:
        cost, rank = heapq.heappop(load)
        owners[layer.layer_index] = rank
        heapq.heappush(load, (cost + layer.out_features * layer.in_features * min(layer.out_features, layer.in_features),
                              rank))
    return owners


def rounds(layers: list[RosaLinear], owners: dict[int, int], world_size: int) -> list[list[RosaLinear]]:
    """Rounds of at most one layer per owner, so owners compute their SVDs concurrently."""
    per_rank = [[l for l in layers if owners[l.layer_index] == r] for r in range(world_size)]
    depth = max((len(p) for p in per_rank), default=0)
    return [[p[k] for p in per_rank if k < len(p)] for k in range(depth)]


# --- the resample ---------------------------------------------------------------------------
def check_finite_everywhere(named_layers: list[tuple[str, RosaLinear]], frozen: bool = True) -> None:
    """Raise on every rank, naming the layers, if any rank's slice of W_f, A or B is non-finite.

    Checked before anything is modified, and agreed by all ranks (an error on one rank alone
    would leave the others waiting in a collective forever)."""
    bad = torch.zeros(len(named_layers), dtype=torch.int32, device=device())
    for i, (_, layer) in enumerate(named_layers):
        for p in (*(layer.frozen_tensors() if frozen else ()), layer.rosa_A, layer.rosa_B):  # W_f or its master
            local = p.ds_tensor if is_zero3(p) else p
            if not torch.isfinite(local).all():
                bad[i] = 1
    if dist.is_initialized():
        dist.all_reduce(bad)
    names = [n for (n, _), flag in zip(named_layers, bad.tolist()) if flag]
    if names:
        raise FloatingPointError(
            f"ROSA layers with non-finite weights or factors: {', '.join(names)}; refusing to merge "
            "(lower the learning rate, enable gradient clipping, or resume from an earlier checkpoint)")


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


def _broadcast(tensors: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    # gloo garbles non-contiguous tensors (torch.linalg.svd returns strided U/Vh): always contiguous.
    out = [t.contiguous() for t in tensors]
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in out:
            dist.broadcast(t, src=src)
    return out


def _broadcast_owned(new: dict[int, tuple[torch.Tensor, torch.Tensor]], layers: list[RosaLinear],
                     owners: dict[int, int], world: int, dev) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every owner's new (A', B') on every rank: one broadcast per owner of all its layers' factors
    packed flat (world-size collectives instead of two per layer)."""
    rank, _ = rank_and_world()
    out = {}
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
        if world > 1:
            dist.broadcast(flat, src=src)
        for l, (a_shape, b_shape), part in zip(mine, shapes, flat.split(sizes)):
            a, b = part.split([a_shape[0] * a_shape[1], b_shape[0] * b_shape[1]])
            out[l.layer_index] = (a.view(a_shape), b.view(b_shape))
    return out


def write_everywhere(layer: RosaLinear, factors: Factors | None, src: int, merged: torch.Tensor | None = None,
                     broadcast: bool = True) -> None:
    """Make the owner's new (W_f, A, B) the value on every rank: module params and fp32 masters.

    Only A and B travel. Under ZeRO-3 the owner writes the full W_f inside GatheredParameters and
    DeepSpeed re-partitions it; a quantized base (host master, replicated buffers) is recomputed
    by every other rank from its own ``merged`` W. ``broadcast=False``: every rank already holds
    the same ``factors`` (it computed them itself; the benchmarks' every-rank scheme).
    """
    rank, _ = rank_and_world()
    m, n, r = layer.out_features, layer.in_features, layer.rank
    dev = device()
    if factors is None:
        factors = Factors(None, torch.empty(m, r, device=dev), torch.empty(r, n, device=dev))
    a, b = (t.to(dev) for t in (factors.a, factors.b))
    if broadcast:
        a, b = _broadcast([a, b], src)
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
        return _resample_everywhere(layers, config, resample_index, rank)
    if replicated:
        return _resample_replicated(named, config, resample_index, rank, world)
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


class _Clock:
    """Wall seconds per phase of a resample on this rank (reported in the resample event)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.totals[name] = round(self.totals.get(name, 0.0) + time.perf_counter() - start, 4)


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
    clock, dev = _Clock(), device()
    with clock("gather_s"):
        values = full_fp32_many([p for l in layers for p in (l.rosa_A, l.rosa_B)])
        old = {l.layer_index: (values[2 * k], values[2 * k + 1]) for k, l in enumerate(layers)}
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bad = torch.zeros(len(layers), dtype=torch.int32, device=dev)
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
        if dist.is_initialized() and world > 1:
            dist.all_reduce(bad)
        names = [n for (n, _), flag in zip(named, bad.tolist()) if flag]
        if names:
            raise FloatingPointError(f"ROSA layers with non-finite merged weights: {', '.join(names)}; refusing to "
                                     "merge (lower the learning rate, enable gradient clipping, or resume from an "
                                     "earlier checkpoint)")
        new = _broadcast_owned(new, layers, owners, world if dist.is_initialized() else 1, dev)
    with clock("write_s"):
        for layer in layers:
            i = layer.layer_index
            a, b = new.pop(i)
            w_f = frozen_update(layer.frozen_weight().detach(), *old.pop(i), a, b)
            layer.write(Factors(w_f, a, b))
            set_fp32_master(layer.rosa_A, a)
            set_fp32_master(layer.rosa_B, b)
    return {"layers": len(layers), "svds_here": sum(owners[l.layer_index] == rank for l in layers), **clock.totals}


def _resample_everywhere(layers: list[RosaLinear], config: RosaConfig, resample_index: int,
                        rank: int) -> dict[str, int]:
    svds = 0
    for layer in layers:
        merged = merged_on_owner(layer, True)
        factors = new_factors(merged, config, resample_index, layer.layer_index)
        svds += 1
        # ZeRO-3 keeps a write from one rank only; every rank holds the same values anyway
        write_everywhere(layer, factors, src=0, merged=merged, broadcast=False)
    return {"layers": len(layers), "svds_here": svds}


# --- optimizer state ------------------------------------------------------------------------
def _flat_groups(optimizer) -> list[tuple[list[torch.nn.Parameter], torch.Tensor, dict | None]]:
    """(module params, flat fp32 tensor keyed in the base optimizer's state, its param group)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: per sub-group
        base = optimizer.optimizer
        return [(list(optimizer.fp16_groups[i]), flat, base.param_groups[optimizer.sub_group_to_group_id[i]])
                for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)]
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        base = optimizer.optimizer
        return [(list(optimizer.bit16_groups[i]), flat, base.param_groups[i])
                for i, flat in enumerate(optimizer.single_partition_of_fp32_groups)]
    raise TypeError(f"ROSA cannot reset the state of optimizer wrapper {type(optimizer).__name__}; "
                    "use ZeRO stage 1, 2 or 3")


def reset_factor_state(optimizer, factor_params: list[torch.nn.Parameter]) -> int:
    """Clear the base optimizer's state for every flat group holding the factors.

    Clearing (rather than zeroing named tensors) works for any optimizer whose state is created
    lazily on the next step: torch Adam/AdamW, DeepSpeed CPU Adam, bitsandbytes 8-bit optimizers
    (whose keys are not ``exp_avg``). Group-level step counters (FusedAdam) are reset too.
    Returns the number of flat groups reset.
    """
    factor_ids = {id(p) for p in factor_params}
    base = optimizer.optimizer
    reset = 0
    for params, flat, group in _flat_groups(optimizer):
        ids = {id(p) for p in params}
        if not ids & factor_ids:
            continue
        if not ids <= factor_ids:
            raise RuntimeError("a flat optimizer group mixes ROSA factors with other trainable parameters; "
                               "build the engine with rosa_ds.initialize (it keeps them in separate groups)")
        base.state.pop(flat, None)
        if group is not None and "step" in group:
            group["step"] = 0
        reset += 1
    return reset


def factor_state(optimizer, factor_params: list[torch.nn.Parameter]) -> list[dict]:
    """The base optimizer's state dicts for the factor groups (tests inspect them)."""
    factor_ids = {id(p) for p in factor_params}
    return [optimizer.optimizer.state.get(flat, {}) for params, flat, _ in _flat_groups(optimizer)
            if {id(p) for p in params} <= factor_ids]
