"""The trainer's hook: predicted and measured per-rank memory written into the run's output
directory (memory_report.json / .md, rank 0; every rank's census goes into the JSON)."""
from __future__ import annotations

from .census import counts_from_engine, measure
from .plan import MemoryPlan
from .predict import model_reduction, predict
from .report import write_memory_report


def plan_for_run(trainer, counts) -> MemoryPlan:
    """MemoryPlan from a Trainer's resolved DeepSpeed config and flags (duck-typed)."""
    import torch

    cfg = trainer.cfg
    return MemoryPlan.from_ds_config(
        trainer.ds_config, method=cfg.method, rank=max(int(getattr(cfg, "rank", 8)), 1),
        world_size=int(trainer.world), dp_rank=int(trainer.rank), micro_batch=int(cfg.micro_batch),
        seq_len=int(cfg.seq_len), optimizer="adamw8bit" if getattr(cfg, "optim", "adamw") == "adamw8bit" else "adamw",
        accelerator="cuda" if torch.cuda.is_available() else "cpu")


def regather_persistent(module) -> int:
    """Gather again the ZeRO-3 persistent parameters (numel <= stage3_param_persistence_threshold)
    that a ``GatheredParameters`` exit left partitioned; returns their elements. Collective.

    Persistent parameters stay whole between forwards, but every ``GatheredParameters`` exit
    (ROSA resample, checkpoint save of W_f, merged export) partitions them again until the next
    forward fetches them. A census right after a save would miss them (measured < predicted by
    their size) although every training step holds them; this restores the training resident
    set exactly as the next forward would. Duck-typed: ``ds_persist``/``ds_status`` attributes."""
    persist = [p for p in module.parameters() if getattr(p, "ds_persist", False)]
    missing = [p for p in persist if getattr(getattr(p, "ds_status", None), "name", "") == "NOT_AVAILABLE"]
    if persist:  # every rank passes the same list (module order); DeepSpeed skips available ones
        persist[0].all_gather(param_list=persist)
    return sum(int(p.ds_numel) for p in missing)


def write_run_report(trainer, point: str = "after_step") -> dict:
    """Census the trainer's engine now (after training: ``after_step``), predict for the same
    plan, write the comparison into ``trainer.out`` (rank 0). Returns the report dict."""
    import torch.distributed as dist

    ds = getattr(trainer.engine, "ds", trainer.engine)
    regathered = regather_persistent(ds.module)
    counts = counts_from_engine(ds)
    plan = plan_for_run(trainer, counts)
    predicted, measured = predict(counts, plan, point), measure(ds)
    gathered = [measured.to_dict()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, measured.to_dict())
    if int(trainer.rank) != 0:
        return {}
    extra = {"census_point": point, "measured_all_ranks": gathered, "rho": counts.rho,
             "n_trainable": counts.n_trainable, "n_frozen": counts.n_frozen,
             "zero3_persistent_regathered": regathered}
    if plan.method != "full":
        from dataclasses import replace

        from .counts import ModelCounts

        full = ModelCounts(groups=[[counts.n_frozen + counts.n_trainable - plan.rank * sum(
            m + n for m, n in counts.adapted)]])
        extra["closed_form_reduction_vs_full"] = model_reduction(full, counts, replace(plan, method="full"))
    return write_memory_report(trainer.out, predicted, measured, plan, extra)
