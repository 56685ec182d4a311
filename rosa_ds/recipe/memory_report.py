"""The trainer's hook: predicted and measured per-rank memory written into the run's output
directory (memory_report.json / .md, rank 0; every rank's census goes into the JSON)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..ds.census import counts_from_engine, measure, regather_persistent
from ..memory.counts import ModelCounts
from ..memory.plan import MemoryPlan
from ..memory.predict import activation_prediction, model_reduction, predict
from ..memory.report import write_memory_report
from .preflight import run_plan


def plan_for_run(trainer) -> MemoryPlan:
    """The run's ``MemoryPlan`` (``preflight.run_plan``) for this rank and the engine's choice of
    W_f masters."""
    import torch

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return run_plan(trainer.cfg, trainer.ds_config, int(trainer.world), accelerator,
                    dp_rank=int(trainer.rank), frozen_master=frozen_master(trainer))


def frozen_master(trainer) -> Optional[bool]:
    """Whether the engine keeps fp32 masters of W_f, as it resolved ``RosaConfig.frozen_master``."""
    config = getattr(trainer.engine, "rosa_config", None)
    return None if config is None else bool(config.frozen_master)


def phase_peaks(trainer) -> dict:
    """Accelerator peak bytes (GPU only) of the training steps and of the resamples, each measured
    from a reset at the phase's start (``rosa_ds.ds.dist.PeakMemory``), so neither includes the
    other, nor evaluation, generation or checkpoint saves: the step peak is what the per-step
    prediction is compared with."""
    out = {}
    if getattr(trainer, "step_peak", 0):
        out["train_step_peak_bytes"] = int(trainer.step_peak)
    events = getattr(getattr(trainer.engine, "state", None), "events", [])
    resample = [e["resample_peak_bytes"] for e in events if "resample_peak_bytes" in e]
    if resample:
        out["resample_peak_bytes"] = max(resample)
    return out


def write_run_report(trainer, point: str = "after_step") -> dict:
    """Census the trainer's engine now (after training: ``after_step``), predict for the same
    plan, write the comparison into ``trainer.out`` (rank 0). Returns the report dict."""
    import torch.distributed as dist

    ds = trainer.engine.ds
    regathered = regather_persistent(ds.module)
    counts = counts_from_engine(ds)
    plan = plan_for_run(trainer)
    predicted, measured = predict(counts, plan, point), measure(ds)
    gathered = [measured.to_dict()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured.to_dict())
    if int(trainer.rank) != 0:
        return {}
    extra = {"census_point": point, "measured_all_ranks": gathered, "rho": counts.rho,
             "n_trainable": counts.n_trainable, "n_frozen": counts.n_frozen,
             "zero3_persistent_regathered": regathered, **phase_peaks(trainer)}
    if getattr(trainer, "activations", None) is not None:
        extra["activations"] = activations_row(trainer.activations, counts, plan)
    if plan.method != "full":
        full = ModelCounts(groups=[[counts.n_frozen + counts.n_trainable - plan.rank * sum(
            m + n for m, n in counts.adapted)]])
        extra["closed_form_reduction_vs_full"] = model_reduction(full, counts, replace(plan, method="full"))
    return write_memory_report(trainer.out, predicted, measured, plan, extra)


def activations_row(measured: dict, counts: ModelCounts, plan: MemoryPlan) -> dict:
    """The first micro step's census beside the prediction for that batch's shape."""
    shape = replace(plan, micro_batch=measured["micro_batch"], seq_len=measured["seq_len"],
                    attention_mask=measured["masked"])
    pred = activation_prediction(counts, shape)
    return {**measured, "checkpointing": plan.activation_checkpointing, "predicted": pred.saved,
            "recompute": pred.recompute, "terms": pred.terms, "family": pred.family}
