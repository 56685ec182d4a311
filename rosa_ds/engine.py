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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import checkpoint, zero
from .config import RosaConfig
from .inject import apply_rosa, iter_rosa_layers, mark_trainable
from .log import log_rank0
from .schedule import ScheduleConfig


@dataclass
class RosaState:
    """What the engine adds to DeepSpeed's own state; saved with every checkpoint."""

    resamples: int = 0
    last_resample_step: Optional[int] = None
    epoch: int = 0
    events: list = field(default_factory=list)


def load_ds_config(config: Union[str, Path, dict]) -> dict:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist; pass a JSON file such as ds_configs/zero2.json")
    return json.loads(path.read_text())


def _auto_keys(cfg, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


def validate_ds_config(cfg: dict, client_optimizer: bool) -> None:
    """Refuse combinations ROSA cannot run, before DeepSpeed starts (one clear message each)."""
    autos = sorted(_auto_keys(cfg))
    if autos:
        raise ValueError(f"the DeepSpeed config still has \"auto\" values ({', '.join(autos)}); fill them with "
                         "rosa_ds.dsconfig.build_ds_config(template, RunValues(...), world_size) or set them")
    zero = cfg.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage {stage} is not supported by rosa_ds: ROSA needs DeepSpeed's flat fp32 "
                         "partitions to write new factors into; use stage 1 (ds_configs/zero1.json), which on "
                         "one GPU costs the same memory as stage 0")
    if cfg.get("bf16", {}).get("enabled") is True and cfg.get("fp16", {}).get("enabled") is True:
        raise ValueError("the DeepSpeed config enables both bf16 and fp16; enable one of them")
    if cfg.get("fp16", {}).get("enabled") is True and not torch.cuda.is_available():
        raise ValueError("fp16 is not supported by DeepSpeed's CPU accelerator; use fp32 (the CPU default) "
                         "or bf16, or run on a GPU")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and client_optimizer and not cfg.get("zero_force_ds_cpu_optimizer") is False:
        raise ValueError("optimizer CPU offload runs DeepSpeed's CPU Adam; a client optimizer (e.g. --optim adamw8bit) "
                         "cannot be offloaded: drop offload_optimizer from the config or use the DeepSpeed optimizer")
    if offload == "nvme":
        raise ValueError("NVMe optimizer offload is not supported by rosa_ds (resampling clears optimizer state in "
                         "memory); use offload_optimizer.device = cpu")


def param_groups(model: nn.Module) -> list[dict]:
    """Factors in one group, other trainable parameters (modules_to_save) in another: a resample
    resets the factors' flat group only, and the head keeps its Adam state."""
    factors = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1].startswith("rosa_")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.rsplit(".", 1)[-1].startswith("rosa_")]
    groups = [{"params": factors, "name": "rosa_factors"}] if factors else []
    if others:
        groups.append({"params": others, "name": "trainable"})
    if not groups:
        raise ValueError("the model has no trainable parameters; apply ROSA or mark modules trainable")
    return groups


class RosaEngine:
    """Wraps a ``deepspeed.DeepSpeedEngine`` (``self.ds``); forwards everything it does not define."""

    def __init__(self, ds_engine, rosa_config: Optional[RosaConfig], schedule: ScheduleConfig) -> None:
        self.ds = ds_engine
        self.rosa_config = rosa_config
        self.schedule = schedule
        self.state = RosaState()
        # DeepSpeed's is_gradient_accumulation_boundary() describes the NEXT micro step once step()
        # has run; this records whether the last step() completed an optimizer step.
        self.at_boundary = True
        self.factor_params = [p for n, p in ds_engine.module.named_parameters() if n.rsplit(".", 1)[-1].startswith("rosa_")]

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
        step-scheduled resample if due. Returns the resample event, if one happened."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        since = None if self.state.last_resample_step is None else self.global_step - self.state.last_resample_step
        factor = self.schedule.lr_factor(since) if boundary else 1.0
        groups = self.ds.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        if factor != 1.0:
            for g in groups:
                g["lr"] = g["lr"] * factor
        self.ds.step()
        self.at_boundary = boundary
        if factor != 1.0:  # undo the scaling unless a scheduler has set a new lr meanwhile
            for g, lr, scaled in zip(groups, saved, [s * factor for s in saved]):
                if g["lr"] == scaled:
                    g["lr"] = lr
        if boundary and self.rosa_config is not None and self.schedule.due_after_step(self.global_step):
            return self.resample()
        return None

    def end_epoch(self, epoch: int, num_epochs: int) -> Optional[dict]:
        """Call after the last step of epoch ``epoch`` (0-based): resamples if the schedule says so."""
        self.state.epoch = epoch + 1
        if self.rosa_config is not None and self.schedule.due_at_epoch_end(epoch, num_epochs):
            return self.resample()
        return None

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
        start = time.perf_counter()
        index = self.state.resamples + 1
        counts = zero.distributed_resample(self.ds.module, self.rosa_config, index, owner_svd=owner_svd)
        groups = zero.reset_factor_state(self.ds.optimizer, self.factor_params)
        self.state.resamples = index
        self.state.last_resample_step = self.global_step
        event = {"event": "resample", "index": index, "step": self.global_step, "epoch": self.state.epoch,
                 "seconds": round(time.perf_counter() - start, 4), "optimizer_groups_reset": groups, **counts}
        self.state.events.append(event)
        log_rank0(f"resample {index} at step {self.global_step}: {counts['layers']} layers in {event['seconds']:.2f}s")
        return event

    # --- checkpoints and export ------------------------------------------------------------
    def save_checkpoint(self, save_dir: Union[str, Path], tag: Optional[str] = None,
                        client_state: Optional[dict] = None) -> Path:
        """Atomic DeepSpeed checkpoint plus ROSA state (W_f, resample count, seeds, RNG)."""
        return checkpoint.save(self, Path(save_dir), tag or f"step_{self.global_step:08d}", client_state or {})

    def load_checkpoint(self, load_dir: Union[str, Path], tag: Optional[str] = None) -> dict:
        """Resume exactly; returns the client state saved with it (e.g. the data position)."""
        return checkpoint.load(self, Path(load_dir), tag)

    def merged_state_dict(self) -> Optional[dict]:
        """The plain model's full state dict (W = W_f + A B merged in fp32, cast once) on rank 0."""
        return checkpoint.merged_state_dict(self)

    def save_merged(self, out_dir: Union[str, Path], tokenizer=None) -> Optional[Path]:
        """Write the final plain model (safetensors) loadable by ``AutoModel*.from_pretrained``."""
        return checkpoint.save_merged(self, Path(out_dir), tokenizer)


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
    zero.init_distributed()
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    ds_config = load_ds_config(config)
    validate_ds_config(ds_config, client_optimizer=optimizer is not None)
    has_rosa = any(True for _ in iter_rosa_layers(model))
    if rosa_config is not None and not has_rosa:
        apply_rosa(model, rosa_config, factorize=False)  # W_f = W, A = B = 0: same function
        zero.distributed_resample(model, rosa_config, 0)  # one SVD per layer in the world
    elif rosa_config is not None:
        mark_trainable(model, rosa_config)
    elif has_rosa:
        rosa_config = model.rosa_config
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("pass the client optimizer as a factory (params -> optimizer), e.g. "
                        "lambda params: torch.optim.AdamW(params, lr=...), so it is built on rosa_ds's param groups")
    ds_engine = zero.ds_initialize(model, param_groups(model), ds_config, optimizer, lr_scheduler)
    return RosaEngine(ds_engine, rosa_config, schedule or ScheduleConfig())
