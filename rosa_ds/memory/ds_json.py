"""Reading a DeepSpeed JSON config: the one place that knows where each setting lives.

Pure dict logic (no DeepSpeed, no torch), so the memory planner and the DeepSpeed seam read a
config the same way: ``rosa_ds.memory.plan`` builds its plan from these readers and
``rosa_ds.ds.config`` validates and fills templates with them. Absent keys read as DeepSpeed's
own defaults (stage 0, no offload, fp32).
"""
from __future__ import annotations

from typing import Any, Optional

AUTO = "auto"
OFFLOAD_TARGETS = ("cpu", "nvme")

# ZeRO knobs the memory plan reads, JSON key -> MemoryPlan field (element counts / flags).
ZERO_KNOBS = {
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
}


def zero_section(cfg: dict) -> dict:
    """The ``zero_optimization`` block ({} when absent or null)."""
    return cfg.get("zero_optimization") or {}


def zero_stage(cfg: dict) -> Any:
    """ZeRO stage of a config (DeepSpeed's default is 0 when absent; may still be "auto")."""
    return zero_section(cfg).get("stage", 0)


def offload_device(cfg: dict, key: str) -> str:
    """Device of ``zero_optimization.<key>`` (``offload_optimizer`` / ``offload_param``), or "none"."""
    off = zero_section(cfg).get(key)
    return off.get("device", "none") if isinstance(off, dict) else "none"


def offload_optimizer(cfg: dict) -> bool:
    """True if optimizer state (and fp32 master weights) live off the accelerator (cpu or nvme)."""
    return offload_device(cfg, "offload_optimizer") in OFFLOAD_TARGETS


def offload_param(cfg: dict) -> bool:
    """True if ZeRO-3 parameters are offloaded (cpu or nvme)."""
    return offload_device(cfg, "offload_param") in OFFLOAD_TARGETS


def precision_flags(cfg: dict) -> dict:
    """``{"bf16": enabled, "fp16": enabled}`` as written (True, False or "auto")."""
    return {k: (cfg.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16")}


def declared_dtype(cfg: dict) -> Optional[str]:
    """Precision a config fixes: bf16 / fp16 / fp32, or None while it still says "auto"."""
    flags = precision_flags(cfg)
    if any(v == AUTO for v in flags.values()) and not any(v is True for v in flags.values()):
        return None
    return precision(cfg)


def precision(cfg: dict) -> str:
    """``bf16``, ``fp16`` or ``fp32`` of a filled config."""
    for name, enabled in precision_flags(cfg).items():
        if enabled is True:
            return name
    return "fp32"


def batch_sizes(cfg: dict) -> tuple[int, int, int]:
    """(micro-batch per rank, accumulation steps, global train batch) of a filled config."""
    return (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"])


def zero_knobs(cfg: dict) -> dict:
    """The numeric ZeRO knobs a config sets, as ``MemoryPlan`` field names (numbers only: "auto"
    and absent keys are left to the plan's defaults), plus ``overlap_comm`` when given."""
    zero = zero_section(cfg)
    out = {field: int(zero[key]) for key, field in ZERO_KNOBS.items()
           if isinstance(zero.get(key), (int, float)) and not isinstance(zero.get(key), bool)}
    if "overlap_comm" in zero:
        out["overlap_comm"] = bool(zero["overlap_comm"])
    return out
