"""``RosaCallback``: ROSA in any ``transformers.Trainer`` (TRL's included) as one callback.

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                         callbacks=[RosaCallback(RosaConfig(rank=8), ScheduleConfig("epoch"))])

Used alone, it applies ROSA when the Trainer finishes ``__init__`` (``on_init_end``: before the
Trainer builds its optimizer or DeepSpeed engine, which happens in ``train()``), finds the
optimizer (DeepSpeed's, under accelerate's wrapper) at ``on_train_begin`` and resamples on the
schedule. ``RosaTrainer`` / ``with_rosa`` add one bound to their own ``RosaRun`` and add what a
callback cannot do: factor param groups of their own, ROSA state in checkpoints and resume, and
``save_model`` writing the merged model (alone: ``callback.save_merged(dir)`` after ``train()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from transformers import TrainerCallback

from ..config import RosaConfig
from ..ds.engine_view import engine_view
from ..schedule import ScheduleConfig
from .checks import RosaTrainerError
from .setup import prepare_for_trainer


@dataclass
class CallbackHost:
    """The Trainer attributes ``RosaRun`` reads, built from what callback events are handed."""

    model: Any
    optimizer: Any
    state: Any
    deepspeed: Any = None
    processing_class: Any = None


class RosaCallback(TrainerCallback):
    """Resamples after optimizer steps and at epoch ends, and adds ``rosa_resamples`` to the
    training logs and ``state.log_history`` (TensorBoard, W&B, trainer_state.json see it).
    ``on_step_end`` runs only at gradient accumulation boundaries, after the optimizer and LR
    scheduler stepped and before the step's evaluation and save, so a checkpoint always holds a
    whole resample cycle.

    ``RosaCallback(rosa_config, schedule)``: used alone (pass it in ``callbacks=[...]`` of the
    Trainer's constructor). ``rosa_config`` may be None for a model already through ``apply_rosa``."""

    def __init__(self, rosa_config: Optional[RosaConfig] = None, schedule: Optional[ScheduleConfig] = None,
                 *, run=None) -> None:
        if rosa_config is not None and not isinstance(rosa_config, RosaConfig):
            raise RosaTrainerError(f"RosaCallback(rosa_config=...) takes a rosa_ds.RosaConfig, got "
                                   f"{type(rosa_config).__name__}; e.g. RosaCallback(RosaConfig(rank=8))")
        self.rosa_config, self.schedule = rosa_config, schedule or ScheduleConfig()
        self.run, self.ds_config, self.applied = run, None, run is not None

    @classmethod
    def bound(cls, run) -> RosaCallback:
        """The callback ``RosaTrainer`` adds: drives its ``RosaRun`` (ROSA applied already)."""
        return cls(run.state.rosa_config, run.state.schedule, run=run)

    # --- used alone: apply at init end, find the optimizer at train begin ----------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self.applied:
            return
        self.rosa_config, self.ds_config = prepare_for_trainer(model, args, self.rosa_config, self.schedule)
        self.applied = True

    def on_train_begin(self, args, state, control, model=None, optimizer=None, processing_class=None, **kwargs):
        if self.run is not None and not isinstance(self.run.trainer, CallbackHost):
            return  # RosaTrainer's own run
        if not self.applied:
            raise RosaTrainerError("RosaCallback was added after the Trainer was built (trainer.add_callback), too "
                                   "late to apply ROSA before the optimizer; pass callbacks=[RosaCallback(...)] to "
                                   "the Trainer's constructor")
        if state.global_step > 0:
            raise RosaTrainerError("RosaCallback alone cannot resume (its checkpoints hold no ROSA state); use "
                                   "with_rosa(YourTrainer)(..., rosa_config=...) for runs that resume")
        from .run import RosaRun

        host = CallbackHost(model, optimizer, state, processing_class=processing_class)
        host.deepspeed = engine_view(model, optimizer, self.ds_config, lambda: state.global_step)
        self.run = RosaRun(host, self.rosa_config, self.schedule)
        self.run.check_optimizer()

    def save_merged(self, out_dir) -> None:
        """The merged plain model (``from_pretrained`` loads it) and the processing class in
        ``out_dir``, after ``train()``. Call on every rank (collective under DeepSpeed)."""
        from pathlib import Path

        if self.run is None:
            raise RosaTrainerError("RosaCallback.save_merged() comes after trainer.train()")
        self.run.export(Path(out_dir), tokenizer=self.run.trainer.processing_class)

    # --- both ---------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        self.run.after_step(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.run.after_epoch(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.run is None:
            return
        logs["rosa_resamples"] = self.run.state.resamples  # for the loggers after this callback
        # Trainer.log stored a copy of ``logs`` in log_history just before calling on_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["rosa_resamples"] = self.run.state.resamples
