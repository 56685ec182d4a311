"""The run's memory report: predicted and measured per-rank memory written into its output
directory (memory_report.json / .md, rank 0; every rank's census goes into the JSON)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..ds.census import counts_from_engine, measure, regather_persistent
from ..memory.counts import ModelCounts
from ..memory.plan import MemoryPlan
from ..memory.predict import activation_prediction, model_reduction, predict
from ..memory.report import write_memory_report


def phase_peaks(step_peak: int, events: list) -> dict:
    """Accelerator peak bytes (GPU only) of the training steps and of the resamples, each measured
    from a reset at the phase's start (``rosa_ds.ds.dist.PeakMemory``), so neither includes the
    other, nor evaluation, generation or checkpoint saves: the step peak is what the per-step
    prediction is compared with."""
    out = {}
    if step_peak:
        out["train_step_peak_bytes"] = int(step_peak)
    resample = [e["resample_peak_bytes"] for e in events if "resample_peak_bytes" in e]
    if resample:
        out["resample_peak_bytes"] = max(resample)
    return out


def write_run_report(spec, engine, step_peak: int = 0, activations: Optional[dict] = None,
                     point: str = "after_step") -> dict:
    """Census ``engine`` now (after training: ``after_step``), predict for the run's own memory
    plan (``RunSpec.memory``, the one the preflight checked), write the comparison into the run's
    output directory (rank 0). Returns the report dict."""
    import torch.distributed as dist

    ds = engine.ds
    regathered = regather_persistent(ds.module)
    counts = counts_from_engine(ds)
    plan = spec.memory
    predicted, measured = predict(counts, plan, point), measure(ds)
    gathered = [measured.to_dict()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured.to_dict())
    if spec.rank != 0:
        return {}
    extra = {"census_point": point, "measured_all_ranks": gathered, "rho": counts.rho,
             "n_trainable": counts.n_trainable, "n_frozen": counts.n_frozen,
             "zero3_persistent_regathered": regathered,
             **phase_peaks(step_peak, getattr(getattr(engine, "state", None), "events", []))}
    if activations is not None:
        extra["activations"] = activations_row(activations, counts, plan)
    if spec.method.adapter:
        full = ModelCounts(groups=[[counts.n_frozen + counts.n_trainable - plan.rank * sum(
            m + n for m, n in counts.adapted)]])
        extra["closed_form_reduction_vs_full"] = model_reduction(full, counts, replace(plan, method="full"))
    return write_memory_report(spec.out, predicted, measured, plan, extra)


def activations_row(measured: dict, counts: ModelCounts, plan: MemoryPlan) -> dict:
    """The first micro step's census beside the prediction for that batch's shape."""
    shape = replace(plan, micro_batch=measured["micro_batch"], seq_len=measured["seq_len"],
                    attention_mask=measured["masked"])
    pred = activation_prediction(counts, shape)
    return {**measured, "checkpointing": plan.activation_checkpointing, "predicted": pred.saved,
            "recompute": pred.recompute, "terms": pred.terms, "family": pred.family}
