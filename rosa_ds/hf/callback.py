"""The Trainer callback that drives ROSA's schedule (added by ``RosaTrainer``)."""
from __future__ import annotations

from transformers import TrainerCallback


class RosaCallback(TrainerCallback):
    """Resamples after optimizer steps and at epoch ends, and adds ``rosa_resamples`` to the
    training logs (TensorBoard, W&B, ... see it). ``on_step_end`` runs only at gradient
    accumulation boundaries, after the optimizer and LR scheduler stepped and before the step's
    evaluation and save, so a checkpoint always holds a whole resample cycle."""

    def __init__(self, run) -> None:
        self.run = run

    def on_step_end(self, args, state, control, **kwargs):
        self.run.after_step(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.run.after_epoch(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["rosa_resamples"] = self.run.state.resamples
