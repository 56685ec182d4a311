"""The factors' optimizer state inside DeepSpeed's ZeRO optimizers: find it and reset it.

DeepSpeed flattens each param group into one fp32 tensor per rank, and the base optimizer keys
its state by that flat tensor. A resample clears the state of the flat groups that hold the
factors, which zeroes the moments AND resets the step counter (bias correction restarts;
keeping the step with zeroed moments makes the first update up to ~3x too large). The factors
sit in a group of their own (``engine.param_groups``), so a head's state is never touched.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


class UnsupportedOptimizer(ConfigError):
    """An optimizer wrapper whose flat groups rosa_ds cannot find (the message names the fix)."""


def flat_groups(optimizer) -> list[tuple[list[torch.nn.Parameter], torch.Tensor, dict | None]]:
    """(module params, flat fp32 tensor keyed in the base optimizer's state, its param group)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: per sub-group
        base = optimizer.optimizer
        return [(list(optimizer.fp16_groups[i]), flat, base.param_groups[optimizer.sub_group_to_group_id[i]])
                for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)]
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        base = optimizer.optimizer
        return [(list(optimizer.bit16_groups[i]), flat, base.param_groups[i])
                for i, flat in enumerate(optimizer.single_partition_of_fp32_groups)]
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer: ZeRO-1 + bf16 + fp32 grad accumulation
        base = optimizer.optimizer
        return [(list(optimizer.bf16_groups[i]), flat, base.param_groups[i])
                for i, flat in enumerate(optimizer.fp32_groups_flat_partition)]
    raise UnsupportedOptimizer(f"ROSA cannot reset the state of optimizer wrapper {type(optimizer).__name__}; "
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
    for params, flat, group in flat_groups(optimizer):
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
    return [optimizer.optimizer.state.get(flat, {}) for params, flat, _ in flat_groups(optimizer)
            if {id(p) for p in params} <= factor_ids]


def reset_plain_factor_state(optimizer: torch.optim.Optimizer, factor_params: list[torch.nn.Parameter]) -> int:
    """The same reset for a plain torch optimizer (no DeepSpeed), whose state is keyed per
    parameter: the factors' entries (``exp_avg``, ``exp_avg_sq``, ``step``) are dropped and created
    afresh on the next step. Returns the number of param groups reset; raises if a group mixes
    the factors with other parameters (resetting it would wipe their state too)."""
    factor_ids = {id(p) for p in factor_params}
    reset = 0
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if not ids & factor_ids:
            continue
        if not ids <= factor_ids:
            raise RuntimeError("an optimizer param group mixes ROSA factors with other trainable parameters; "
                               "put the factors in a group of their own (rosa_ds.hf builds such groups)")
        for p in group["params"]:
            optimizer.state.pop(p, None)
        if "step" in group:
            group["step"] = 0
        reset += 1
    return reset
