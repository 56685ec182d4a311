"""The DeepSpeed seam: the only module of rosa_ds that imports deepspeed.

What a resample must touch under ZeRO, per adapted layer (W_f frozen; A, B trainable):

* the module parameters W_f, A, B (``copy_`` into them: under ZeRO-1/2 A and B are views into
  a flat bf16/fp32 buffer; under ZeRO-3 each rank holds a 1/N slice, ``ds_tensor``, and a write
  persists only from ``GatheredParameters(modifier_rank=r)`` on rank r);
* the fp32 master copies of A and B (a slice of a flat fp32 partition per rank);
* the optimizer state of the flat groups that hold the factors: cleared, which zeroes the
  moments AND resets the step counter (bias correction restarts; keeping the step with zeroed
  moments makes the first update up to ~3x too large).

Coordination: every layer has one owner rank (greedy balance of SVD cost m n min(m, n)). Layers
are processed in rounds of at most one layer per rank: all ranks gather the round's merged
weights (collective), each owner runs its SVD (the round's SVDs run in parallel, each exactly
once in the world), then each owner's result is broadcast and written everywhere. By
construction a rank holds at most two extra dense layers at a time (its pending merge and one
layer in transit).
"""
from __future__ import annotations

import contextlib
import heapq
import os
from typing import Iterable, Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

from .config import RosaConfig
from .factorize import Factors, new_factors
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
def check_finite_everywhere(named_layers: list[tuple[str, RosaLinear]]) -> None:
    """Raise on every rank, naming the layers, if any rank's slice of W_f, A or B is non-finite.

    Checked before anything is modified, and agreed by all ranks (an error on one rank alone
    would leave the others waiting in a collective forever)."""
    bad = torch.zeros(len(named_layers), dtype=torch.int32, device=device())
    for i, (_, layer) in enumerate(named_layers):
        for p in (layer.base_layer.weight, layer.rosa_A, layer.rosa_B):
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
    """W = W_f + A B in fp32 from the fp32 masters of A, B; collective, returned on the owner only."""
    a, b = full_fp32(layer.rosa_A), full_fp32(layer.rosa_B)
    with gathered([layer.base_layer.weight]):
        if not is_owner:
            return None
        return layer.frozen_weight().detach().float() + a @ b


def _broadcast(tensors: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    # gloo garbles non-contiguous tensors (torch.linalg.svd returns strided U/Vh): always contiguous.
    out = [t.contiguous() for t in tensors]
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in out:
            dist.broadcast(t, src=src)
    return out


def write_everywhere(layer: RosaLinear, factors: Factors | None, src: int) -> None:
    """Make the owner's new (W_f, A, B) the value on every rank: module params and fp32 masters."""
    rank, _ = rank_and_world()
    m, n, r = layer.out_features, layer.in_features, layer.rank
    dev = device()
    if factors is None:
        factors = Factors(torch.empty(m, n, device=dev), torch.empty(m, r, device=dev), torch.empty(r, n, device=dev))
    factors = Factors(*(t.to(dev) for t in factors))
    if is_zero3(layer.rosa_A):
        a, b = _broadcast([factors.a, factors.b], src)  # every rank needs them for its master slice
        with gathered([layer.base_layer.weight, layer.rosa_A, layer.rosa_B], modifier_rank=src):
            if rank == src:
                layer.write(factors)
    else:
        w_f, a, b = _broadcast(list(factors), src)
        layer.write(Factors(w_f, a, b))
    set_fp32_master(layer.rosa_A, a)
    set_fp32_master(layer.rosa_B, b)


@torch.no_grad()
def distributed_resample(model: torch.nn.Module, config: RosaConfig, resample_index: int) -> dict[str, int]:
    """Merge and redraw every ROSA layer of ``model`` across ranks (see the module docstring).

    Works before ``deepspeed.initialize`` too (plain parameters): with A = B = 0 it is the
    initial factorization. The caller resets the optimizer state afterwards. Returns counts.
    """
    rank, world = rank_and_world()
    named = list(iter_rosa_layers(model))
    check_finite_everywhere(named)
    layers = [l for _, l in named]
    owners = assign_owners(layers, world)
    svds = 0
    for group in rounds(layers, owners, world):
        pending = {}
        for layer in group:  # collective gathers, one layer at a time
            merged = merged_on_owner(layer, owners[layer.layer_index] == rank)
            if merged is not None:
                pending[layer.layer_index] = merged
        mine = {i: new_factors(w, config, resample_index, i) for i, w in pending.items()}
        svds += len(mine)
        del pending
        for layer in group:
            write_everywhere(layer, mine.pop(layer.layer_index, None), owners[layer.layer_index])
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
