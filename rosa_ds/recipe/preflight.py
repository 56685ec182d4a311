"""Preflight: before any weight loads, does the run fit the memory it has? If not, one line with
the prediction, what is available, and the planner's best configuration that fits, as flags.

The prediction is the accountant's per-rank peak over the run's phases (``rosa_ds.memory.phases``)
plus the runtime reserve (``rosa_ds.memory.planner.rank_need``, the rule the planner ranks by), for
the model built on the meta device from its config. Available: on CUDA the device's memory (or ``--max-memory`` if
smaller); on the CPU ``--max-memory`` (host RAM per rank), without which nothing is checked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..memory.counts import arch_from_config, counts_from_module
from ..memory.plan import MemoryPlan
from ..memory.planner import Cluster, best_for, plan_cluster, rank_need
from ..utils.sizes import format_size, parse_size
from .methods import method_of
from .tasks import task_of


@dataclass
class Verdict:
    """Predicted per-rank need (bytes, at ``phase``) against ``available`` (None: not checked)."""

    need: int
    available: Optional[int]
    phase: str

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available


def meta_counts(cfg, model_config):
    """Counts of the run's model on the meta device (no weights), as the engine will train it."""
    task = task_of(cfg.data.task)
    with torch.device("meta"):
        model = task.model_class().from_config(model_config)
    keep = tuple(cfg.rosa.modules_to_save or task.keep(model))
    counts = counts_from_module(model, cfg.method, cfg.rosa.rank, cfg.rosa.target_modules, keep,
                                method_of(cfg.method).quantize_base(cfg))
    counts.arch = arch_from_config(model_config, classification=task.labelled)
    return counts


def run_plan(cfg, ds_config: dict, world: int, accelerator: str, dp_rank: int = 0) -> MemoryPlan:
    """The run as the memory accountant sees it: the one translation of a run's settings into a
    ``MemoryPlan`` (preflight and the run's memory report both use it, so they predict alike).

    With --pack a row holds at most seq_len tokens and transformers still builds a (block-diagonal)
    mask per layer, so micro_batch x seq_len with a mask stays an upper bound. ``frozen_master``
    is ``RosaConfig.frozen_master`` as given: None resolves by precision in the plan as in the engine.
    """
    return MemoryPlan.from_ds_config(ds_config, method=cfg.method, rank=cfg.rosa.rank, world_size=world,
                                     dp_rank=dp_rank, micro_batch=cfg.micro_batch, seq_len=cfg.data.seq_len,
                                     optimizer=cfg.optim, accelerator=accelerator,
                                     frozen_master=cfg.rosa.frozen_master,
                                     activation_checkpointing=cfg.gradient_checkpointing)


def available_bytes(cfg, accelerator: str) -> Optional[int]:
    limit = parse_size(cfg.max_memory) if cfg.max_memory else None
    if accelerator == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        total = torch.cuda.get_device_properties(local).total_memory
        return min(total, limit) if limit else total
    return limit


def verdict(counts, plan: MemoryPlan, available: Optional[int]) -> Verdict:
    phase, need, _ = rank_need(counts, plan)  # the planner's own rule, so its suggestions agree
    return Verdict(need, available, phase)


def suggestion(cfg, model_config, plan: MemoryPlan, available: int, world: int) -> str:
    """The planner's best configuration of the same global batch that fits, as flags."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cluster = Cluster(available, local, max(world // max(local, 1), 1), accelerator=plan.accelerator)
    quantize = ("nf4",) if method_of(cfg.method).quantizes and cfg.optim == "adamw" else ()
    planned = plan_cluster(model_config, cluster, global_batch=cfg.micro_batch * cfg.grad_accum * world,
                           seq_len=cfg.data.seq_len, dtype=plan.dtype, rank=cfg.rosa.rank,
                           methods=(cfg.method,), quantize=quantize, targets=cfg.rosa.target_modules,
                           attention_mask=plan.attention_mask)
    best = best_for(planned, cfg.method)
    if best is None:
        return "nothing the planner knows fits; give more memory or more ranks (python -m rosa_ds.memory --budget)"
    return f"fix: run with {best.flags()} (predicted {format_size(best.device_peak)} per rank)"


def check_fits(cfg, model_config, plan: MemoryPlan) -> Verdict:
    """The run's predicted per-rank peak under ``plan`` (``run_plan``); one line if it does not fit
    what is available."""
    available = available_bytes(cfg, plan.accelerator)
    v = verdict(meta_counts(cfg, model_config), plan, available)
    if v.fits:
        return v
    world = plan.world_size
    stage = plan.zero_stage
    where = "--max-memory" if cfg.max_memory and parse_size(cfg.max_memory) == available else "the GPU's memory"
    raise ConfigError(f"the run is predicted to need {format_size(v.need)} per rank at its peak ({v.phase}; "
                      f"ZeRO-{stage}"
                      f"{', offload' if plan.offload_optimizer else ''}, micro-batch {cfg.micro_batch}"
                      f"{', checkpointing' if cfg.gradient_checkpointing else ''}) but {format_size(available)} is "
                      f"available ({where}); {suggestion(cfg, model_config, plan, available, world)}")
