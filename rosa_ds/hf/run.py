"""ROSA's bookkeeping inside a Trainer: when to resample, the resample itself, the ROSA part of a
Trainer checkpoint, and the merged export.

With DeepSpeed the resample is ``rosa_ds.ds.resample.resample_engine``, the engine's own code
(owner-rank SVDs; module params, fp32 masters and optimizer state written; state reset).
Without DeepSpeed (one process) it is the pure method, ``rosa_ds.inject.resample``, followed by
dropping the factors' entries from the torch optimizer's state (``exp_avg``, ``exp_avg_sq``,
``step``); several processes without DeepSpeed (DDP) share ``distributed_resample``.

A Trainer checkpoint ``checkpoint-N/`` gets, beside the Trainer's and DeepSpeed's files:

    rosa_state.json     ROSA config, schedule, resample count and history, world layout (format 2)
    frozen/rosa/        the frozen record (``rosa_ds.ds.frozen_record``): W_f (per-rank ZeRO-3
                        partitions or one replicated copy) and the owners' fp32 masters of W_f,
                        which neither DeepSpeed's files (frozen parameters have no optimizer
                        state; ZeRO-3 keeps only partitions) nor ``model.safetensors`` hold
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..config import RosaConfig
from ..ds import export, frozen_record
from ..ds.agree import CheckpointError, agree
from ..ds.checkpoint import FORMAT, RosaState, check_compatible, describe_module
from ..ds.dist import barrier, rank_and_world
from ..ds.optim import flat_groups, reset_plain_factor_state
from ..ds.params import settle
from ..ds.resample import distributed_resample, resample_engine
from ..ds.write_guard import WriteGuard
from ..inject import iter_rosa_layers
from ..inject import resample as pure_resample
from ..layer import is_adapter_param
from ..schedule import ScheduleConfig
from ..utils.io import atomic_write_text
from ..utils.log import log_rank0
from .checks import RosaTrainerError

STATE_FILE = "rosa_state.json"
RECORD_KEY = "rosa"


def plain_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper; a clear error for anything else."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RosaTrainerError(f"the Trainer's optimizer {type(optimizer).__name__} is not a torch optimizer, so "
                               "ROSA cannot reset its factors' state at a resample; use --optim adamw_torch")
    return optimizer


class RosaRun:
    """ROSA's state and actions for one Trainer (``trainer.rosa``). ``trainer`` is the Trainer, or
    for a ``RosaCallback`` used alone a ``CallbackHost`` with the same attributes (``model``,
    ``optimizer``, ``deepspeed``, ``state``, ``processing_class``)."""

    def __init__(self, trainer, rosa_config: RosaConfig, schedule: ScheduleConfig) -> None:
        self.trainer = trainer
        self.state = RosaState(rosa_config=rosa_config, schedule=schedule)
        self.factor_params = [p for n, p in trainer.model.named_parameters() if is_adapter_param(n)]

    @property
    def engine(self):
        """The DeepSpeed engine once the Trainer built it (None before, and without DeepSpeed)."""
        return getattr(self.trainer, "deepspeed", None)

    def _zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage()) if self.engine is not None else 0

    def check_optimizer(self) -> None:
        """After the Trainer built its optimizer: the factors' state can be found and reset alone."""
        factor_ids = {id(p) for p in self.factor_params}
        if self.engine is not None:
            lists = [params for params, _, _ in flat_groups(self.engine.optimizer)]
        else:
            lists = [g["params"] for g in plain_optimizer(self.trainer.optimizer).param_groups]
        for params in lists:
            ids = {id(p) for p in params}
            if ids & factor_ids and not ids <= factor_ids:
                raise RosaTrainerError("an optimizer param group mixes ROSA factors with other parameters, so a "
                                       "resample would wipe their state too; use RosaTrainer or "
                                       "with_rosa(YourTrainer), which give the factors groups of their own (and do not "
                                       "pass optimizers=(...) built on model.parameters())")

    # --- schedule --------------------------------------------------------------------------
    def after_step(self, hf_state) -> None:
        """After an optimizer step (the Trainer's ``on_step_end``, accumulation boundaries only)."""
        if self.engine is not None:
            applied = bool(self.engine.was_step_applied())
        else:  # accelerate's optimizer wrapper knows whether fp16 loss scaling skipped the step
            applied = not getattr(self.trainer.optimizer, "step_was_skipped", False)
        self.state.applied_steps += int(applied)
        if applied and self.state.schedule.due_after_step(self.state.applied_steps, hf_state.max_steps,
                                                          hf_state.global_step):
            self.resample()
        # the last step of an epoch: resample now, before this step's save, so a checkpoint taken
        # here resumes into the next epoch with the epoch-end resample already done
        if hf_state.epoch is not None and float(hf_state.epoch).is_integer():
            self.after_epoch(hf_state)

    def after_epoch(self, hf_state) -> None:
        """At a completed epoch (``on_epoch_end`` too, for loops whose last step did not see it)."""
        if hf_state.epoch is None or not float(hf_state.epoch).is_integer():
            return  # stopped mid-epoch (max_steps, early stopping): no boundary to resample at
        done = int(hf_state.epoch)
        if done <= self.state.epoch:
            return
        self.state.epoch = done
        if self.state.schedule.due_at_epoch_end(done - 1, int(hf_state.num_train_epochs), hf_state.global_step,
                                                hf_state.max_steps):
            self.resample()

    # --- the resample -----------------------------------------------------------------------
    def resample(self) -> dict:
        """Merge A B into W_f, draw new subspaces, reset the factors' optimizer state (collective)."""
        if self.engine is not None:
            return resample_engine(self.engine, self.state, self.factor_params)
        model, index = self.trainer.model, self.state.resamples + 1
        start = time.perf_counter()
        if rank_and_world()[1] == 1:
            pure_resample(model, resample_index=index)
            counts = {"layers": sum(1 for _ in iter_rosa_layers(model))}
        else:
            counts = distributed_resample(model, self.state.rosa_config, index)
        groups = reset_plain_factor_state(plain_optimizer(self.trainer.optimizer), self.factor_params)
        step = int(self.trainer.state.global_step)
        event = self.state.record_resample(index, step, time.perf_counter() - start,
                                           {"optimizer_groups_reset": groups, **counts})
        log_rank0(f"resample {index} at step {step} in {event['seconds']:.2f}s")
        return event

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, ckpt: Path) -> None:
        """Write the ROSA part of Trainer checkpoint ``ckpt`` (collective)."""
        if self.engine is not None:
            settle(self.engine)
        module = self.trainer.model
        frozen = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters()
                     if not p.requires_grad)
        frozen_record.write(module, ckpt, RECORD_KEY, WriteGuard(ckpt), lambda: (frozen, "the frozen weights"))
        if rank_and_world()[0] == 0:
            saved = {"format": FORMAT, **describe_module(module, self._zero_stage(), self.state),
                     "global_step": int(self.trainer.state.global_step), "schedule": asdict(self.state.schedule),
                     "state": self.state.progress()}
            atomic_write_text(ckpt / STATE_FILE, json.dumps(saved, indent=1))
        barrier()

    def read(self, ckpt: Path) -> dict:
        """The checkpoint's ROSA state, checked against this run on every rank."""
        found = {}

        def check() -> None:
            path = ckpt / STATE_FILE
            if not path.is_file() or not frozen_record.is_complete(frozen_record.record_dir(ckpt, RECORD_KEY)):
                raise CheckpointError(f"{ckpt} has no complete ROSA state ({STATE_FILE}, frozen/{RECORD_KEY}): it was "
                                      "not written by RosaTrainer or its save was interrupted; resume from another "
                                      "checkpoint")
            found["saved"] = json.loads(path.read_text())
            check_compatible(found["saved"], describe_module(self.trainer.model, self._zero_stage(), self.state), ckpt)

        agree(check, f"cannot resume from {ckpt}")
        return found["saved"]

    def restore_weights(self, ckpt: Path) -> dict:
        """W_f and its fp32 masters from ``ckpt`` (collective); returns the saved state."""
        saved = self.read(ckpt)
        if self.engine is not None:
            settle(self.engine)
        frozen_record.restore(self.trainer.model, frozen_record.record_dir(ckpt, RECORD_KEY))
        return saved

    def restore(self, ckpt: Path) -> None:
        """Resume: the frozen weights and ROSA's progress (resample count, applied steps, epoch)."""
        saved = self.restore_weights(ckpt)
        self.state.restore(saved["state"], int(saved["global_step"]))
        if self.engine is None:
            self.trainer.model.rosa_resamples = self.state.resamples  # the pure method's next index
        log_rank0(f"ROSA state resumed from {ckpt}: {self.state.resamples} resamples so far")

    def export(self, out_dir: Path, tokenizer=None) -> Optional[Path]:
        """The merged plain model (W = W_f + A B, fp32 merge, cast once), streamed (collective)."""
        if self.engine is not None:
            settle(self.engine)
        return export.save_merged(self.trainer.model, Path(out_dir), tokenizer)
