"""RosaEngine: a DeepSpeed engine that also resamples ROSA subspaces on a schedule.

    engine = rosa_ds.initialize(model, RosaConfig(rank=8), config="ds_configs/zero2.json")
    for epoch in range(E):
        for batch in loader:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()            # resamples after every N steps if so scheduled
        engine.end_epoch(epoch, E)   # resamples at the epoch boundary (default schedule)

Only the factors (and ``modules_to_save``) are handed to DeepSpeed as trainable, in their own
param groups, so only they carry gradients, fp32 masters and optimizer state at every stage.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import RosaConfig
from ..errors import ConfigError, config_field
from ..layer import is_adapter_param
from ..schedule import ScheduleConfig
from . import checkpoint, export
from .checkpoint import RosaState
from .config import check_ds_config, load_template
from .dist import init_distributed, rank_and_world
from .params import settle, write_pending_masters
from .prepare import place_masters, prepare_model, resolve_frozen_master
from .resample import resample_engine

__all__ = ["RosaEngine", "initialize", "param_groups", "place_masters", "resolve_frozen_master"]


def param_groups(model: nn.Module) -> list[dict]:
    """Factors in one group, other trainable parameters (modules_to_save) in another: a resample
    resets the factors' flat group only, and the head keeps its Adam state."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    factors = [p for n, p in trainable if is_adapter_param(n)]
    others = [p for n, p in trainable if not is_adapter_param(n)]
    groups = [{"params": factors, "name": "rosa_factors"}] if factors else []
    if others:
        groups.append({"params": others, "name": "trainable"})
    if not groups:
        raise ConfigError("the model has no trainable parameters; apply ROSA or mark modules trainable")
    return groups


class RosaEngine:
    """Wraps a ``deepspeed.DeepSpeedEngine`` (``self.ds``); forwards everything it does not define."""

    def __init__(self, ds_engine, rosa_config: Optional[RosaConfig], schedule: ScheduleConfig) -> None:
        self.ds = ds_engine
        self.state = RosaState(rosa_config=rosa_config, schedule=schedule, run_id=checkpoint.new_run_id())
        # DeepSpeed's is_gradient_accumulation_boundary() describes the NEXT micro step once step()
        # has run; this records whether the last step() completed an optimizer step.
        self.at_boundary = True
        # the run's optimizer steps, when the caller knows them (the CLI trainer sets it): no
        # resample after the final one (ScheduleConfig.due_after_step)
        self.total_steps: Optional[int] = None
        self.factor_params = [p for n, p in ds_engine.module.named_parameters() if is_adapter_param(n)]

    @property
    def rosa_config(self) -> Optional[RosaConfig]:
        return self.state.rosa_config

    @property
    def schedule(self) -> ScheduleConfig:
        return self.state.schedule

    # --- DeepSpeed passthrough ----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # module, optimizer, lr_scheduler, global_steps, train(), ...
        return getattr(self.ds, name)

    @property
    def global_step(self) -> int:
        return int(self.ds.global_steps)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> Optional[dict]:
        """Optimizer step (at accumulation boundaries), with the optional re-warmup factor; then a
        step-scheduled resample if due. Returns the resample event, if one happened.

        Schedules count *applied* optimizer steps: with fp16 loss scaling DeepSpeed skips a step
        whose gradients overflowed but still counts it in ``global_steps``; ``was_step_applied``
        tells them apart, so neither the re-warmup window nor "every N steps" counts skipped ones."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        state = self.state
        since = None if state.last_resample_applied is None else state.applied_steps - state.last_resample_applied
        factor = self.schedule.lr_factor(since, self._schedule_position()) if boundary else 1.0
        groups = self.ds.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        if factor != 1.0:
            for g in groups:
                g["lr"] = g["lr"] * factor
        self.ds.step()
        self.at_boundary = boundary
        applied = boundary and self.ds.was_step_applied()
        state.applied_steps += int(applied)
        if factor != 1.0:  # undo the scaling unless a scheduler has set a new lr meanwhile
            for g, lr, scaled in zip(groups, saved, [s * factor for s in saved]):
                if g["lr"] == scaled:
                    g["lr"] = lr
        if applied and self.rosa_config is not None and self.schedule.due_after_step(
                state.applied_steps, self.total_steps, self.global_step):
            return self.resample()
        return None

    def _schedule_position(self) -> Optional[tuple[int, int, int]]:
        """(iteration, warmup steps, total steps) of a warmup-decay scheduler, for a restarted
        schedule; None without one (``initialize`` refuses --restart-schedule then)."""
        sched = getattr(self.ds, "lr_scheduler", None)
        if not all(hasattr(sched, a) for a in ("last_batch_iteration", "warmup_num_steps", "total_num_steps")):
            return None
        return int(sched.last_batch_iteration), int(sched.warmup_num_steps), int(sched.total_num_steps)

    def grad_norm(self) -> Optional[float]:
        """L2 norm of the whole (all-reduced, unscaled) gradient at the last optimizer step, before
        clipping; None where DeepSpeed did not compute one. A float on the host: DeepSpeed has
        already synchronized to compute it."""
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def write_scalars(self, values: dict[str, float]) -> None:
        """Add scalars to DeepSpeed's monitor (TensorBoard / CSV / W&B as the config enables them),
        beside its own ``Train/Samples/*`` curves and on the same x axis (samples seen)."""
        monitor = getattr(self.ds, "monitor", None)
        if monitor is None or not monitor.enabled or self.ds.global_rank != 0:
            return
        monitor.write_events([(f"Train/Samples/{k}", float(v), self.ds.global_samples)
                              for k, v in values.items() if v is not None])

    def end_epoch(self, epoch: int, num_epochs: int) -> Optional[dict]:
        """Call after the last step of epoch ``epoch`` (0-based): resamples if the schedule says so."""
        self.state.epoch = epoch + 1
        if self.rosa_config is not None and self.schedule.due_at_epoch_end(epoch, num_epochs, self.global_step,
                                                                           self.total_steps):
            return self.resample()
        return None

    def settle(self) -> None:
        """Release ZeRO-3's gathered or in-flight parameters (``params.settle``; collective)."""
        settle(self.ds)

    # --- ROSA ----------------------------------------------------------------------------
    def resample(self, owner_svd: bool = True) -> dict:
        """Merge A B into W, draw new subspaces (one SVD per layer in the world), write module
        params and fp32 masters on every rank, and reset the factors' optimizer state.
        ``owner_svd=False``: every rank does every SVD (the benchmarks' naive baseline)."""
        if self.rosa_config is None:
            raise RuntimeError("this engine trains without ROSA layers; there is nothing to resample")
        if not self.at_boundary:
            raise RuntimeError("resample() between micro-steps of one optimizer step would drop the partial "
                               "gradients; call it after engine.step() at an accumulation boundary")
        return resample_engine(self.ds, self.state, self.factor_params, owner_svd=owner_svd)

    # --- checkpoints and export ------------------------------------------------------------
    def save_checkpoint(self, save_dir: Union[str, Path], tag: Optional[str] = None,
                        client_state: Optional[dict] = None) -> Path:
        """Atomic DeepSpeed checkpoint plus ROSA state (W_f, resample count, seeds, RNG)."""
        self.settle()
        return checkpoint.save(self.ds, self.state, Path(save_dir), tag or f"step_{self.global_step:08d}",
                               client_state or {})

    def prune_checkpoints(self, save_dir: Union[str, Path], keep: int) -> None:
        """Keep the ``keep`` newest complete checkpoints and the frozen records they use (call on
        every rank; rank 0 deletes)."""
        if rank_and_world()[0] == 0:
            checkpoint.prune(Path(save_dir), keep)

    def load_checkpoint(self, load_dir: Union[str, Path], tag: Optional[str] = None) -> dict:
        """Resume exactly; returns the client state saved with it (e.g. the data position)."""
        return checkpoint.load(self.ds, self.state, Path(load_dir), tag)

    def merged_state_dict(self) -> Optional[dict]:
        """The plain model's full state dict (W = W_f + A B merged in fp32, cast once) on rank 0."""
        self.settle()
        return export.merged_state_dict(self.ds.module)

    def save_merged(self, out_dir: Union[str, Path], tokenizer=None) -> Optional[Path]:
        """Write the final plain model (safetensors) loadable by ``AutoModel*.from_pretrained``."""
        self.settle()
        return export.save_merged(self.ds.module, Path(out_dir), tokenizer)


def initialize(model: nn.Module, rosa_config: Optional[RosaConfig] = None, config: Union[str, Path, dict, None] = None,
               args=None, optimizer: Optional[Callable] = None, lr_scheduler=None,
               schedule: Optional[ScheduleConfig] = None) -> RosaEngine:
    """Mirror of ``deepspeed.initialize`` for ROSA.

    Args:
        model: a plain model (ROSA is applied here) or one already passed through ``apply_rosa``.
            ``rosa_config=None`` and no ROSA layers: plain DeepSpeed training (full FT / PEFT
            LoRA baselines) through the same engine.
        config: DeepSpeed config dict or JSON path (or ``args.deepspeed_config``).
        optimizer: a client optimizer *factory* ``params -> Optimizer`` (DeepSpeed calls it with
            the param groups), e.g. ``lambda p: torch.optim.AdamW(p, lr=1e-3)``.
        lr_scheduler: a scheduler or a factory ``optimizer -> scheduler``.
    """
    import deepspeed

    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError("pass the client optimizer as a factory (params -> optimizer), e.g. "
                          "lambda params: torch.optim.AdamW(params, lr=...), so it is built on rosa_ds's param groups")
    init_distributed()
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    ds_config, source = load_template(config)
    check_ds_config(ds_config, source, client_optimizer=optimizer is not None)
    rosa_config = prepare_model(model, rosa_config, ds_config)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config,
                                              optimizer=optimizer, lr_scheduler=lr_scheduler)
    # the first factorization's exact A, B: DeepSpeed built their masters from the rounded modules
    write_pending_masters(p for p in model.parameters() if p.requires_grad)
    engine = RosaEngine(ds_engine, rosa_config, schedule or ScheduleConfig())
    if engine.schedule.restart_schedule and engine._schedule_position() is None:
        restart = config_field("restart_schedule")
        raise ConfigError(f"{restart} restarts a warmup-decay schedule, but the DeepSpeed config has no "
                          f"WarmupDecayLR scheduler; fix: keep the template's scheduler or drop {restart}")
    return engine
