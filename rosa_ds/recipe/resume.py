"""What a resume must keep and may change, worded as the trainer's flags.

``rosa_ds.ds.verify`` compares a checkpoint with this run by config field (the one resume check);
this module gives it this run's facts (``plan_facts``, also recorded with every checkpoint) and
turns its differences into the command line's words: a refusal in one line before any weight
loads, or a notice of schedule changes (logged and recorded in ``metrics.jsonl``).
"""
from __future__ import annotations

from typing import Any

from ..ds.verify import Difference, ResumeMismatch
from ..utils.io import stable_hash
from ..utils.options import flag_name
from .config import TrainConfig, sync_from_ds
from .methods import method_of

# Facts that decide which samples an optimizer step trains.
STEP_SAMPLE = ("world_size", "micro_batch", "grad_accum", "data", "seq_len", "pack")


def data_fingerprint(examples: list) -> str:
    """The training examples' content in training-split order: any change to the file, the split
    (--seed), --max-train-samples or the field mapping changes it; a moved file does not."""
    return stable_hash([e.values for e in examples], 16)


def plan_facts(cfg: TrainConfig, ds_config: dict, train_examples: list) -> dict:
    """This run's facts by config field, with the values the filled DeepSpeed config really uses."""
    used = sync_from_ds(cfg, ds_config)
    facts = {"method": cfg.method, "micro_batch": used.micro_batch, "grad_accum": used.grad_accum,
             "data": data_fingerprint(train_examples), "seq_len": cfg.data.seq_len, "pack": cfg.data.pack,
             "lr": used.lr, "warmup": cfg.warmup, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
             "weight_decay": used.weight_decay}
    return {**facts, **method_of(cfg.method).resume_facts(cfg)}


def refusal(exc: ResumeMismatch) -> str:
    """The one line of a refused resume, every difference named by its flag."""
    return (f"--resume: cannot continue from {exc.ckpt}: " + "; ".join(_refused(d) for d in exc.differences)
            + "; or start a new run without --resume")


def _value(field: str, value: Any) -> str:
    flag = flag_name(field)
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if field == "quantize_base":
        return f"{flag} {value}" if value else f"no {flag}"
    return f"{flag} {value}"


def _refused(d: Difference) -> str:
    if d.field == "world_size":
        return (f"it was saved by {d.saved} ranks, this run has {d.now} (launch as many ranks as the saving run: "
                "the same step would train other samples)")
    if d.field == "zero_stage":
        return (f"it was saved with ZeRO stage {d.saved}, this run uses {d.now} "
                "(use the saving run's --deepspeed config)")
    if d.field == "data":
        return ("it was saved with other training data (--dataset, its content, --max-train-samples, --seed or "
                "the field mapping differ): the same step would train other samples")
    if d.field == "format":
        return f"it has checkpoint format {d.saved}, this rosa_ds reads format {d.now}"
    if d.field == "layers":
        return "its ROSA target layers differ from this run's (use the saving run's --target-modules)"
    why = ": the same step would train other samples" if d.field in STEP_SAMPLE else ""
    return f"it was saved with {_value(d.field, d.saved)}, this run has {_value(d.field, d.now)} " \
           f"(use {_value(d.field, d.saved)}{why})"


def notice(ckpt, changes: list[Difference]) -> tuple[str, dict]:
    """(the log line, the ``metrics.jsonl`` record's ``changes``) of a resume that changes the schedule."""
    words = ", ".join(f"{flag_name(d.field)} {d.saved} -> {d.now}" for d in changes)
    return (f"resuming from {ckpt} with a changed schedule: {words} (recorded in metrics.jsonl)",
            {d.field: {"checkpoint": d.saved, "now": d.now} for d in changes})
