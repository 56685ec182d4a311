"""What a run is, decided before any weight loads: ``check(cfg, rank, world)`` -> a frozen ``RunSpec``.

Everything that can be wrong with the input (model, data, fields, sequence length, batch sizes,
DeepSpeed JSON, memory, the checkpoint to resume) fails here in one line, in this order, cheapest
first; what survives is the run's whole plan: the method and task, the tokenized data and the step
plan, the filled DeepSpeed config, the one memory plan (``preflight.run_plan``: the preflight and
the run's memory report read the same one) and the resume choice. The trainer's parts read it and
never recompute any of it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..ds import config as dsconfig
from ..ds import verify
from ..ds.agree import CheckpointError
from ..errors import ConfigError
from ..memory.plan import MemoryPlan
from ..utils.log import log_rank0, warn_rank0
from .config import TrainConfig
from .data import BatchOrder, PackedSplit, check_data, tokenize_data
from .faults import claim_output_dir
from .methods import Method, method_of
from .models import ModelSource, check_model_spec, load_config, load_tokenizer, model_max_length
from .preflight import Verdict, check_fits, run_plan
from .resume import plan_facts, refusal
from .tasks import Task, task_of


@dataclass(frozen=True)
class StepPlan:
    """Which rows each rank trains at each step (``order``) and how many optimizer steps the run has."""

    order: BatchOrder
    total_steps: int


@dataclass(frozen=True)
class ResumeChoice:
    """The intact checkpoint ``--resume`` loads, and the schedule changes the resume makes."""

    path: Path
    changes: tuple


@dataclass(frozen=True)
class RunSpec:
    cfg: TrainConfig
    method: Method
    task: Task
    rank: int
    world: int
    source: ModelSource
    raw: Any  # the checked records (``data.check_data``): label names, the training examples
    tokenizer: Any
    data: Any  # the tokenized splits (``data.tokenize_data``)
    train_set: Any  # what the loader indexes: the packs, or the training samples
    steps: StepPlan
    ds_config: dict
    memory: MemoryPlan  # this rank's plan (dp_rank = rank)
    fit: Verdict
    facts: dict  # recorded with every checkpoint (``resume.plan_facts``)
    resume: Optional[ResumeChoice]

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def total_steps(self) -> int:
        return self.steps.total_steps


def plan_steps(cfg: TrainConfig, rows: int, world: int, rank: int) -> StepPlan:
    """Batch order and step count for ``rows`` training rows (``--max-steps`` caps the epochs)."""
    order = BatchOrder(rows, cfg.micro_batch, world, rank, cfg.grad_accum, cfg.seed)
    spe = order.steps_per_epoch
    return StepPlan(order, min(cfg.max_steps or spe * cfg.epochs, spe * cfg.epochs))


def fill_ds_config(cfg: TrainConfig, steps: StepPlan, world: int) -> dict:
    """The DeepSpeed template filled with this run's values (``rosa_ds.ds.config.build_ds_config``)."""
    ds_config = dsconfig.build_ds_config(cfg.deepspeed, cfg.run_values(steps.total_steps), world)
    if cfg.tensorboard:
        ds_config["tensorboard"] = {"enabled": True, "output_path": str(Path(cfg.output_dir) / "tb"),
                                    "job_name": "rosa_ds"}
    return ds_config


def check(cfg: TrainConfig, rank: int, world: int) -> RunSpec:
    """The run's ``RunSpec``, or one line naming the first problem and its fix (a ``RosaError``)."""
    out = Path(cfg.output_dir)
    claim_output_dir(out, bool(cfg.resume), cfg.overwrite_output_dir, rank)
    method, task = method_of(cfg.method), task_of(cfg.data.task)
    source = check_model_spec(cfg.model, task.name)
    raw = check_data(cfg.data)  # before the model config: reading it from a GGUF takes seconds
    model_config = load_config(source)
    max_len = model_max_length(model_config)
    if max_len is not None and cfg.data.seq_len > max_len:
        raise ConfigError(f"--seq-len {cfg.data.seq_len} is longer than the model's context ({max_len} tokens); "
                          f"use --seq-len {max_len} or less")
    # The memory check comes before tokenizing (a GGUF's tokenizer is its converted copy's). Packing
    # changes only the number of steps, which no field of the memory plan depends on.
    ds_config = fill_ds_config(cfg, plan_steps(cfg, len(raw.train), world, rank), world)
    memory = run_plan(cfg, ds_config, world, dsconfig.accelerator_name(), dp_rank=rank)
    fit = check_fits(cfg, model_config, replace(memory, dp_rank=0))  # every rank the same verdict
    tokenizer = load_tokenizer(source)
    data = tokenize_data(raw, tokenizer)  # chat-template errors and truncated conversations surface here
    train_set = PackedSplit(data.train, cfg.data.seq_len) if cfg.data.pack else data.train
    if cfg.data.pack:
        log_rank0(f"packed {len(data.train)} samples into {len(train_set)} rows of <= "
                  f"{cfg.data.seq_len} tokens ({train_set.stats()['fill']:.0%} full)")
    steps = plan_steps(cfg, len(train_set), world, rank)  # rows: packs, or the samples kept
    ds_config = fill_ds_config(cfg, steps, world)
    facts = plan_facts(cfg, ds_config, raw.train)
    choice = choose_checkpoint(cfg, facts, world, ds_config) if cfg.resume else None
    return RunSpec(cfg, method, task, rank, world, source, raw, tokenizer, data, train_set, steps, ds_config,
                   memory, fit, facts, choice)


def choose_checkpoint(cfg: TrainConfig, facts: dict, world: int, ds_config: dict) -> ResumeChoice:
    """The intact checkpoint ``--resume`` loads, verified on every rank and checked against this
    run's settings from the files alone, before any weight loads (``rosa_ds.ds.verify``)."""
    start = time.perf_counter()
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    if cfg.resume == "latest" and not ckpt_dir.is_dir():
        raise CheckpointError(f"--resume: --output-dir {cfg.output_dir} holds no checkpoints (no {ckpt_dir}); "
                              "check --output-dir, or start without --resume")
    choice = verify.choose(ckpt_dir if cfg.resume == "latest" else Path(cfg.resume))
    for line in choice.warnings:
        warn_rank0(line)
    now = {**facts, "world_size": world, "zero_stage": dsconfig.zero_stage(ds_config)}
    try:
        changes = verify.check_choice(choice, now)
    except verify.ResumeMismatch as exc:
        raise CheckpointError(refusal(exc)) from None
    log_rank0(f"resuming from {choice.path} (step {choice.saved.get('global_step')}): its files are intact "
              f"(checked in {time.perf_counter() - start:.2f}s)")
    return ResumeChoice(choice.path, tuple(changes))
