"""The distributed resample: merge A B into W_f, draw new subspaces, write them on every rank.

What a resample must touch under ZeRO, per adapted layer (W_f frozen; A, B trainable): the module
parameters W_f, A, B (``copy_`` into them, never rebinding ``.data``), the fp32 masters of A and B
(``params.set_fp32_master``), the fp32 master of W_f where one is kept (``RosaConfig.frozen_master``,
on the layer's owner), and the factors' optimizer state (``optim.reset_factor_state``, called by
the engine afterwards).

Every layer has one owner rank (``rosa_ds.owners.assign_owners``); its SVD runs exactly once in the
world, on the owner, and its subspace is drawn from a seed of (seed, resample index, layer index)
that every rank derives alone. Two paths: ``replicated`` (ZeRO-1/2, W_f on every rank) and
``partitioned`` (ZeRO-3); each module's docstring gives its protocol.
"""
from __future__ import annotations

import time

import torch

from ..config import RosaConfig
from ..errors import ConfigError
from ..inject import iter_rosa_layers
from ..layer import RosaLinear
from ..utils.log import log_rank0
from .dist import PeakMemory, device, rank_and_world, synchronize
from .exchange import raise_if_flagged
from .optim import reset_factor_state
from .params import is_zero3, settle
from .partitioned import resample_everywhere, resample_partitioned
from .replicated import resample_replicated


def check_finite_everywhere(named_layers: list[tuple[str, RosaLinear]], frozen: bool = True) -> None:
    """Raise on every rank, naming the layers, if any rank's slice of W_f, A or B is non-finite.
    Checked before anything is modified."""
    bad = torch.zeros(len(named_layers), dtype=torch.int32, device=device())
    for i, (_, layer) in enumerate(named_layers):
        for p in (*(layer.frozen_tensors() if frozen else ()), layer.rosa_A, layer.rosa_B):  # W_f or its master
            local = p.ds_tensor if is_zero3(p) else p
            if not torch.isfinite(local).all():
                bad[i] = 1
    raise_if_flagged([n for n, _ in named_layers], bad, "weights or factors")


def uses_frozen_masters(config: RosaConfig) -> bool:
    """fp32 masters of a bf16 / fp16 W_f, kept by each layer's owner (a quantized base keeps its
    own master on every rank instead). ``initialize`` resolves ``frozen_master=None`` first."""
    return config.frozen_master is True and config.quantize_base is None


@torch.no_grad()
def distributed_resample(model: torch.nn.Module, config: RosaConfig, resample_index: int,
                         owner_svd: bool = True) -> dict[str, int]:
    """Merge and redraw every ROSA layer of ``model`` across ranks (see the module docstring).

    Works before ``deepspeed.initialize`` too (plain parameters): with A = B = 0 it is the
    initial factorization (which also creates the owners' fp32 masters of W_f, if kept). The caller
    resets the optimizer state afterwards. Returns counts and per-phase seconds.
    ``owner_svd=False`` is the naive scheme the benchmarks compare against: every rank computes
    every layer's SVD itself (the same numbers, no broadcast; world-size times the SVD work).
    """
    rank, world = rank_and_world()
    named = list(iter_rosa_layers(model))
    layers = [l for _, l in named]
    mastered = uses_frozen_masters(config)
    replicated = not any(is_zero3(p) for l in layers for p in (l.rosa_A, *l.frozen_params()))
    # the replicated path checks each merged W on its owner (half the reads); factors are checked here
    check_finite_everywhere(named, frozen=not (owner_svd and replicated))
    if not owner_svd:
        if mastered:
            raise ConfigError("the every-rank resample (owner_svd=False) keeps no fp32 masters of W_f; "
                              "use RosaConfig(frozen_master=False) with it")
        return resample_everywhere(layers, config, resample_index)
    if replicated:
        return resample_replicated(named, config, resample_index, rank, world, mastered)
    return resample_partitioned(layers, config, resample_index, rank, world, mastered)


def resample_engine(ds_engine, state, factor_params: list[torch.nn.Parameter], owner_svd: bool = True) -> dict:
    """One resample of a live DeepSpeed engine: merge A B into W, draw new subspaces (one SVD per
    layer in the world), write module params and fp32 masters on every rank, reset the factors'
    optimizer state, and record it in ``state`` (a ``checkpoint.RosaState``). Collective; call at
    an optimizer-step boundary. ``RosaEngine`` and the Trainer integration both go through here.
    Returns the event (index, step, seconds, counts)."""
    settle(ds_engine)
    synchronize()  # accelerator work queued by the training step is not the resample's
    peak = PeakMemory()
    start = time.perf_counter()
    index = state.resamples + 1
    counts = distributed_resample(ds_engine.module, state.rosa_config, index, owner_svd=owner_svd)
    groups = reset_factor_state(ds_engine.optimizer, factor_params)
    synchronize()
    seconds = time.perf_counter() - start
    step = int(ds_engine.global_steps)
    event = state.record_resample(index, step, seconds,
                                  {"optimizer_groups_reset": groups, **counts, **peak.read("resample")})
    log_rank0(f"resample {index} at step {step}: {counts['layers']} layers in {event['seconds']:.2f}s")
    return event
