"""Inputs and outputs of the memory accountant: a validated plan and a per-rank byte breakdown.

No DeepSpeed and no tensors here: a ``MemoryPlan`` says what is trained and how (method, ZeRO
stage, world size, precision, offload, buckets); a ``MemoryBreakdown`` holds bytes per category,
split into what lives on the accelerator (``device``) and in host RAM (``host``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import ConfigError
from .ds_json import declared_dtype, offload_optimizer, zero_knobs, zero_stage

METHODS = ("full", "lora", "rosa")
STAGES = (0, 1, 2, 3)
DTYPES = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
ACCELERATORS = ("cuda", "cpu")
# The ZeRO-3 values the shipped templates leave "auto", by accelerator (``rosa_ds.ds.config`` fills
# them; the planner plans with them). The CPU's keep gloo's few large messages small and do not
# overlap (it doubles the buckets and gains nothing there). A GPU's prefetch whole layers, overlap
# communication with compute and keep every ROSA factor (R x max(m, n) <= 1e6 elements for
# R <= 64 at widths up to 16k) gathered: partitioned, each factor would be its own all-gather,
# hundreds of tiny ones per pass.
ZERO3_AUTO = {
    "cpu": {"overlap_comm": False, "stage3_prefetch_bucket_size": 5_000_000,
            "stage3_param_persistence_threshold": 1000, "stage3_max_live_parameters": 20_000_000,
            "stage3_max_reuse_distance": 20_000_000},
    "cuda": {"overlap_comm": True, "stage3_prefetch_bucket_size": 50_000_000,
             "stage3_param_persistence_threshold": 1_000_000, "stage3_max_live_parameters": 1_000_000_000,
             "stage3_max_reuse_distance": 1_000_000_000},
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Resident categories (verified by the census) and the estimated transient ones (peak only).
CATEGORIES = ("frozen_weights", "quantized_weights", "base_masters", "trainable_weights", "gradients",
              "master_weights", "optimizer_states", "buckets", "buffers", "other")
TRANSIENT = ("transient_buckets", "gathered_params", "activations")
CATEGORY_HELP = {
    "frozen_weights": "weights without gradient (W_f, embeddings, norms under ROSA/LoRA)",
    "quantized_weights": "quantized base (nf4/int8): packed W_f and its fp32 scales (buffers, replicated)",
    "base_masters": "fp32 masters of W_f, host RAM: every layer's with a quantized base (every rank); with bf16/fp16 "
                    "and frozen_master, those of the layers this rank owns",
    "trainable_weights": "compute-precision copy of the trainable weights (ZeRO-1/2: whole flat buffer)",
    "gradients": "gradient partitions / buffers resident between backward and step",
    "master_weights": "fp32 master partitions held by the ZeRO / bf16 optimizer",
    "optimizer_states": "Adam moments (+ step counters; 8-bit: codes, absmax, qmaps)",
    "buckets": "communication buffers resident across steps (ZeRO-3 IPG bucket)",
    "buffers": "module buffers (e.g. rotary inv_freq), replicated, kept in their own dtype",
    "other": "scalars the optimizer keeps (global grad norm, overflow flags)",
    "transient_buckets": "IPG reduce buckets alive only during backward (ZeRO-1/2)",
    "gathered_params": "ZeRO-3 parameters gathered for compute (live + prefetch limits)",
    "activations": "what autograd keeps for backward (per architecture, calibrated by the census; with "
                   "checkpointing plus one layer's recompute), see docs/memory.md",
}


def _check_int(name: str, value, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"MemoryPlan.{name} must be an integer >= {low}, got {value!r}; {fix}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"MemoryPlan.{name} {value!r} is not supported; choose one of "
                          f"{', '.join(map(str, choices))}")


@dataclass
class MemoryPlan:
    """How a model is trained, as far as memory is concerned. Validated at construction.

    Attributes:
        method: ``full`` fine-tuning, ``lora`` (PEFT on the same targets) or ``rosa``.
        rank: R for LoRA/ROSA (ignored for full).
        zero_stage: DeepSpeed ZeRO stage 0-3.
        world_size: N, data-parallel ranks.
        dtype: compute precision of weights and gradients: fp32, bf16 or fp16.
        offload_optimizer: ZeRO ``offload_optimizer.device = cpu``: masters, moments and fp32
            gradient partitions live in host RAM.
        optimizer: ``adamw`` (fp32 moments), ``adamw8bit`` (bitsandbytes blockwise 8-bit) or ``sgd``
            (plain SGD without momentum: no state).
        micro_batch: sequences per rank per micro step (activation estimate).
        seq_len: tokens per sequence (activation estimate).
        activation_checkpointing: each layer keeps only its input; backward recomputes one layer
            at a time (``rosa_ds.memory.activation_terms``).
        attention_mask: batches carry a padding mask (the trainer's padded batches; packed or
            equal-length sequences do not), which transformers materialises per layer.
        reduce_bucket_size: ZeRO ``reduce_bucket_size`` in elements.
        allgather_bucket_size: ZeRO-1/2 ``allgather_bucket_size`` in elements.
        overlap_comm: ZeRO ``overlap_comm`` (doubles the ZeRO-1/2 IPG bucket).
        prefetch_bucket_size: ZeRO-3 ``stage3_prefetch_bucket_size`` in elements.
        max_live_parameters: ZeRO-3 ``stage3_max_live_parameters`` in elements.
        param_persistence_threshold: ZeRO-3 ``stage3_param_persistence_threshold``: parameters
            with at most this many elements stay gathered on every rank.
        accelerator: ``cuda`` or ``cpu``; fp32 ZeRO-3 on CUDA reuses the weight partition as the
            master, on DeepSpeed's CPU accelerator it clones it (measured, docs/memory.md).
        dp_rank: which rank to account for (ZeRO-2 gradient partitions differ slightly by rank).
        frozen_master: ROSA keeps fp32 masters of a bf16 / fp16 W_f on each layer's owner rank
            (``RosaConfig.frozen_master``); ``None``: on for bf16 / fp16, as the engine decides.
    """

    method: str = "rosa"
    rank: int = 8
    zero_stage: int = 2
    world_size: int = 1
    dtype: str = "bf16"
    offload_optimizer: bool = False
    optimizer: str = "adamw"
    micro_batch: int = 1
    seq_len: int = 512
    activation_checkpointing: bool = False
    attention_mask: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    accelerator: str = "cuda"
    dp_rank: int = 0
    frozen_master: Optional[bool] = None

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("zero_stage", self.zero_stage, STAGES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("accelerator", self.accelerator, ACCELERATORS)
        _check_int("world_size", self.world_size, 1, "use 1 for a single process")
        _check_int("rank", self.rank, 1, "ROSA/LoRA need at least one trainable direction")
        for name in ("micro_batch", "seq_len"):
            _check_int(name, getattr(self, name), 1, "give a positive size")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size",
                     "max_live_parameters", "param_persistence_threshold"):
            _check_int(name, getattr(self, name), 0, "give an element count (DeepSpeed's unit)")
        _check_int("dp_rank", self.dp_rank, 0, "give the data-parallel rank")
        if self.dp_rank >= self.world_size:
            raise ConfigError(f"MemoryPlan.dp_rank {self.dp_rank} >= world_size {self.world_size}; "
                              "give a rank below the world size")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("MemoryPlan.offload_optimizer needs ZeRO stage 1-3; set zero_stage or drop the offload")

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of weights and gradients in compute precision."""
        return DTYPE_BYTES[self.dtype]

    @classmethod
    def from_ds_config(cls, ds_config: dict, **kwargs) -> MemoryPlan:
        """Plan fields taken from a DeepSpeed config dict (stage, precision, offload, buckets);
        ``kwargs`` give the rest (method, rank, world_size, ...) and win over the config."""
        fields = {"zero_stage": int(zero_stage(ds_config)), "offload_optimizer": offload_optimizer(ds_config),
                  **zero_knobs(ds_config)}
        dtype = declared_dtype(ds_config)
        if dtype is not None:
            fields["dtype"] = dtype
        fields.update(kwargs)
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self)

    def keeps_frozen_masters(self) -> bool:
        """True if ROSA keeps owner-held fp32 masters of W_f under this plan."""
        if self.method != "rosa":
            return False
        return self.frozen_master if self.frozen_master is not None else self.dtype in ("bf16", "fp16")


@dataclass
class MemoryBreakdown:
    """Bytes per rank by category. ``device`` and ``host`` map category -> bytes."""

    device: dict = field(default_factory=lambda: {c: 0 for c in CATEGORIES + TRANSIENT})
    host: dict = field(default_factory=lambda: {c: 0 for c in CATEGORIES + TRANSIENT})
    peak_device: Optional[int] = None  # measured torch.cuda.max_memory_allocated (CUDA only)
    label: str = ""

    def add(self, category: str, nbytes: int, host: bool = False) -> None:
        if category not in self.device:
            raise KeyError(f"unknown memory category {category!r}; known: {', '.join(CATEGORIES + TRANSIENT)}")
        (self.host if host else self.device)[category] += int(nbytes)

    def total(self, category: str) -> int:
        """Device + host bytes of one category."""
        return self.device[category] + self.host[category]

    def resident(self, where: str = "all") -> int:
        """Sum of the resident categories (what the census verifies)."""
        parts = {"device": (self.device,), "host": (self.host,), "all": (self.device, self.host)}[where]
        return sum(d[c] for d in parts for c in CATEGORIES)

    def state_bytes(self, where: str = "all") -> int:
        """Parameter-related bytes: weights, gradients, masters, moments (the paper's quantity)."""
        keys = ("frozen_weights", "quantized_weights", "base_masters", "trainable_weights", "gradients",
                "master_weights", "optimizer_states")
        parts = {"device": (self.device,), "host": (self.host,), "all": (self.device, self.host)}[where]
        return sum(d[c] for d in parts for c in keys)

    def peak_estimate(self) -> int:
        """Device bytes at the peak: resident + transient + activations (an estimate)."""
        return sum(self.device[c] for c in CATEGORIES + TRANSIENT)

    def to_dict(self) -> dict:
        return {"label": self.label, "device": dict(self.device), "host": dict(self.host),
                "peak_device": self.peak_device}

    @classmethod
    def from_dict(cls, d: dict) -> MemoryBreakdown:
        out = cls(peak_device=d.get("peak_device"), label=d.get("label", ""))
        out.device.update(d.get("device", {}))
        out.host.update(d.get("host", {}))
        return out
