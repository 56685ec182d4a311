"""Predicted bytes per rank: pure arithmetic on parameter counts (no DeepSpeed import).

Every rule below was read in DeepSpeed 0.19.8 and then checked against a census of live
engines (tests/multirank/test_memory_ranks.py); docs/memory.md derives the closed forms.
Notation: w = bytes per weight/gradient element (4 fp32, 2 bf16/fp16), N = world size,
k = optimizer-state bytes per element (8 for Adam: exp_avg + exp_avg_sq in fp32).

* ZeRO-1/2 (stage_1_and_2.py): each param group is flattened into one buffer padded to a
  multiple of 2N elements (``nccl_start_alignment_factor`` * N); every rank keeps the WHOLE flat
  buffer (w bytes/elem) plus an fp32 master partition (padded/N, a clone even in fp32).
  ZeRO-1 and ZeRO-2 both keep ``grads_in_partition``: the full size of every parameter that
  starts in or straddles into this rank's partition (the last rank adds its padding).
* ZeRO-3 (stage3.py, partition_parameters.py): each parameter is partitioned on its own into
  ceil(numel/N) elements; parameters with numel <= persistence threshold also stay gathered.
  The fp32 master is a separate copy unless the weights already are fp32 on the accelerator
  (CUDA; on DeepSpeed's CPU accelerator the device names differ, so it clones). The IPG bucket
  (reduce_bucket_size elements) and the flat gradient partition stay allocated.
* Optimizer offload: masters, moments and an fp32 gradient partition move to the host; ZeRO-3
  still keeps its compute-precision gradient partition on the device.
* Stage 0: the plain optimizer on full-size weights and gradients; in bf16/fp16 DeepSpeed wraps
  torch AdamW in FP16_UnfusedOptimizer with one fp32 master per parameter tensor.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

from ..errors import ConfigError
from ..owners import assign_owners
from .activation_terms import ActivationPrediction, predict_activations
from .counts import ModelCounts
from .plan import MemoryBreakdown, MemoryPlan

ADAM_STEP_BYTES = 4  # torch AdamW keeps `step` as a float32 scalar tensor per parameter tensor
BNB_BLOCK = 256  # bitsandbytes blockwise quantization: one fp32 absmax per 256 elements per moment
BNB_MIN_8BIT = 4096  # smaller tensors keep 32-bit states (bitsandbytes min_8bit_size)
BNB_QMAP_BYTES = 2 * 256 * 4  # two 256-entry fp32 code books, shared by all tensors
# optimizer-state bytes per trainable element, ignoring scalars (the closed forms)
STATE_BYTES_PER_ELEMENT = {"adamw": 8, "adamw8bit": 2 + 8 / BNB_BLOCK, "sgd": 0}


def padded(numel: int, world_size: int) -> int:
    """ZeRO-1/2 and bf16-optimizer flat buffer length: a multiple of 2 N elements."""
    align = 2 * world_size
    return -(-numel // align) * align


def params_in_partition(sizes: list, world_size: int, dp_rank: int) -> list:
    """Sizes of the parameters that start in, or straddle into, ``dp_rank``'s ZeRO-1/2 partition
    (DeepSpeed's ``get_partition_info``)."""
    part = padded(sum(sizes), world_size) // world_size
    start, end, cur, found = part * dp_rank, part * (dp_rank + 1), 0, []
    for size in sizes:
        if start <= cur < end or cur < start < cur + size:
            found.append(size)
        cur += size
    return found


def zero2_grad_partition(sizes: list, world_size: int, dp_rank: int) -> int:
    """Elements of ZeRO-1/2 ``grads_in_partition`` on ``dp_rank``: the FULL numel of each
    parameter in the rank's partition (a straddling parameter is held whole by both ranks)."""
    return sum(params_in_partition(sizes, world_size, dp_rank))


def optimizer_state_bytes(tensor_sizes: list, plan: MemoryPlan, step_scalars: bool = True) -> int:
    """Moments for tensors the inner optimizer holds (flat partitions under ZeRO); plain SGD
    without momentum keeps none."""
    if plan.optimizer == "sgd":
        return 0
    if plan.optimizer == "adamw":
        return sum(8 * n for n in tensor_sizes) + (ADAM_STEP_BYTES * len(tensor_sizes) if step_scalars else 0)
    total, any8 = 0, False
    for n in tensor_sizes:
        if n >= BNB_MIN_8BIT:
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK)
            any8 = True
        else:
            total += 8 * n
    return total + (BNB_QMAP_BYTES if any8 else 0)


def _stage0(c: ModelCounts, p: MemoryPlan, out: MemoryBreakdown) -> None:
    w = p.weight_bytes
    out.add("frozen_weights", w * c.n_frozen)
    if p.dtype == "fp32":
        sizes = [n for g in c.groups for n in g]
        out.add("trainable_weights", 4 * c.n_trainable)
        out.add("gradients", 4 * c.n_trainable)
        out.add("optimizer_states", optimizer_state_bytes(sizes, p))
        return
    # Half precision at stage 0 (torch AdamW): FP16_UnfusedOptimizer keeps one fp32 master per
    # parameter tensor, no flat buffer, no padding (measured).
    sizes = [n for g in c.groups for n in g]
    out.add("trainable_weights", w * c.n_trainable)
    out.add("gradients", w * c.n_trainable)
    out.add("master_weights", 4 * c.n_trainable)
    out.add("optimizer_states", optimizer_state_bytes(sizes, p))


def _stage12(c: ModelCounts, p: MemoryPlan, out: MemoryBreakdown) -> None:
    w, n, host = p.weight_bytes, p.world_size, p.offload_optimizer
    out.add("frozen_weights", w * c.n_frozen)  # replicated: ZeRO-1/2 never partition weights
    parts = [padded(sum(g), n) // n for g in c.groups]
    out.add("trainable_weights", w * sum(padded(sum(g), n) for g in c.groups))
    out.add("master_weights", 4 * sum(parts), host=host)
    out.add("optimizer_states", optimizer_state_bytes(parts, p, step_scalars=not host), host=host)
    if host:  # fp32 gradient of the master partition lives with it on the host
        out.add("gradients", 4 * sum(parts), host=True)
        # two fp32 scalars (grad norm bookkeeping) per parameter in the partition until step
        out.add("other", 8 * sum(len(params_in_partition(g, n, p.dp_rank)) for g in c.groups))
        largest = max((s for g in c.groups for s in g), default=0)
        out.add("buckets", w * largest, host=True)   # temp_grad_buffer_for_cpu_offload
        out.add("buckets", w * largest)              # temp_grad_buffer_for_gpu_offload
        out.add("buckets", w * sum(parts), host=True)  # bit16 staging for the updated partition
    else:  # ZeRO-1 and -2 alike in 0.19.8 (contiguous gradients); the last rank adds its padding
        grads = sum(zero2_grad_partition(g, n, p.dp_rank) for g in c.groups)
        pads = sum(min(padded(sum(g), n) - sum(g), part) for g, part in zip(c.groups, parts))
        out.add("gradients", w * (grads + (pads if p.dp_rank == n - 1 else 0)))
    out.add("other", 4)  # global grad norm scalar
    out.add("transient_buckets", w * p.reduce_bucket_size * (2 if p.overlap_comm else 1))


def _stage3(c: ModelCounts, p: MemoryPlan, out: MemoryBreakdown) -> None:
    w, n, host = p.weight_bytes, p.world_size, p.offload_optimizer
    part = lambda s: -(-s // n)  # noqa: E731  per-parameter partition, padded to N
    keep = lambda s: s <= p.param_persistence_threshold  # noqa: E731  stays gathered on all ranks
    out.add("frozen_weights", w * sum(part(s) + (s if keep(s) else 0) for s in c.frozen))
    parts = [sum(part(s) for s in g) for g in c.groups]
    out.add("trainable_weights", w * sum(parts) + w * sum(s for g in c.groups for s in g if keep(s)))
    shares_master = p.dtype == "fp32" and p.accelerator == "cuda" and not host
    out.add("master_weights", 0 if shares_master else 4 * sum(parts), host=host)
    out.add("optimizer_states", optimizer_state_bytes(parts, p, step_scalars=not host), host=host)
    out.add("gradients", w * sum(parts))  # flat gradient partition buffer, allocated once
    if host:  # plus the fp32 gradients next to the offloaded master
        out.add("gradients", 4 * sum(parts), host=True)
    out.add("buckets", w * p.reduce_bucket_size)  # IPG bucket, allocated once
    # global grad norm (fp64; fp32 with offload) + bool overflow tracker; with offload two fp32
    # scalars per trainable parameter live from backward to step
    out.add("other", (4 + 1 + 8 * sum(len(g) for g in c.groups)) if host else 8 + 1)
    sizes = [s for s in c.frozen + [x for g in c.groups for x in g] if not keep(s)]
    # live + prefetched parameters; one larger than the live limit (an embedding, the LM head) is
    # still fetched whole
    live = max(p.max_live_parameters, max(sizes, default=0)) + p.prefetch_bucket_size
    out.add("gathered_params", w * min(sum(sizes), live))


def activation_bytes(counts: ModelCounts, p: MemoryPlan) -> int:
    """Peak activation bytes per rank of one micro step (``rosa_ds.memory.activation_terms``:
    term by term per architecture family, calibrated by the census; with checkpointing the
    layers' inputs plus one layer's recompute)."""
    return activation_prediction(counts, p).peak


def activation_prediction(counts: ModelCounts, p: MemoryPlan) -> ActivationPrediction:
    """The term-by-term activation prediction for ``counts`` under ``p``."""
    arch = counts.arch
    if not arch.layers or not arch.hidden:
        return ActivationPrediction()
    targets = len(counts.adapted) // arch.layers if p.method != "full" else 0
    return predict_activations(arch, p.micro_batch, p.seq_len, p.weight_bytes, rank=counts.rank if targets else 0,
                               targets=targets, full=p.method == "full", checkpointing=p.activation_checkpointing,
                               accelerator=p.accelerator, masked=p.attention_mask)


POINTS = ("after_backward", "after_step")


def predict(counts: ModelCounts, plan: MemoryPlan, point: str = "after_backward") -> MemoryBreakdown:
    """Per-rank bytes by category for training ``counts`` under ``plan``.

    ``point``: ``after_backward`` (gradients reduced, optimizer state present: the resident set
    at the peak) or ``after_step`` (stage 0-2 free their device gradients in step; ZeRO-3 keeps
    its flat gradient buffer; offloaded fp32 gradients stay on the host)."""
    if point not in POINTS:
        raise ConfigError(f"point {point!r} is not supported; choose one of {', '.join(POINTS)}")
    out = MemoryBreakdown(label=f"{plan.method} predicted")
    {0: _stage0, 1: _stage12, 2: _stage12, 3: _stage3}[plan.zero_stage](counts, plan, out)
    if point == "after_step":
        if plan.zero_stage < 3:
            out.device["gradients"] = 0
        out.device["other"] = {0: 0, 1: 4, 2: 4, 3: 5 if plan.offload_optimizer else 9}[plan.zero_stage]
    out.add("buffers", sum(counts.buffers))  # replicated, kept in their own dtype
    # --quantize-base: packed W_f + scales are module buffers (every rank, every stage: ZeRO-3
    # partitions parameters only), and each rank keeps the fp32 master of every W_f in host RAM;
    # a bf16 / fp16 W_f's fp32 masters live on the layers' owners only
    out.add("quantized_weights", sum(counts.quantized))
    masters = sum(counts.masters)
    if plan.keeps_frozen_masters() and not counts.quantized:
        masters += owned_elements(counts.adapted, plan.world_size, plan.dp_rank)
    out.add("base_masters", 4 * masters, host=True)
    out.add("activations", activation_bytes(counts, plan))
    return out


def owned_elements(adapted: list, world_size: int, rank: int) -> int:
    """m n summed over the adapted matrices ``rank`` owns (``rosa_ds.owners``: the engine's rule)."""
    shapes = [SimpleNamespace(layer_index=i, out_features=m, in_features=n) for i, (m, n) in enumerate(adapted)]
    owners = assign_owners(shapes, world_size)
    return sum(s.out_features * s.in_features for s in shapes if owners[s.layer_index] == rank)


def coefficients(plan: MemoryPlan, where: str = "all") -> tuple[float, float]:
    """(c_f, c_t): resident bytes per frozen and per trainable element, ignoring padding,
    persistence, buckets and scalars. ``where``: ``device``, ``host`` or ``all``."""
    w, n, k = plan.weight_bytes, plan.world_size, STATE_BYTES_PER_ELEMENT[plan.optimizer]
    off = plan.offload_optimizer
    if plan.zero_stage == 0:
        dev = (w, 2 * w + k + (0 if plan.dtype == "fp32" else 4))
        hst = (0, 0)
    elif plan.zero_stage in (1, 2):
        dev = (w, w) if off else (w, w + (4 + w + k) / n)
        hst = (0, (4 + 4 + k) / n) if off else (0, 0)
    else:
        master = 0 if (plan.dtype == "fp32" and plan.accelerator == "cuda" and not off) else 4
        dev = (w / n, 2 * w / n) if off else (w / n, (2 * w + master + k) / n)
        hst = (0, (4 + 4 + k) / n) if off else (0, 0)
    if where == "device":
        return dev
    if where == "host":
        return hst
    return dev[0] + hst[0], dev[1] + hst[1]


def exact_reduction(rho: float, plan: MemoryPlan, where: str = "all") -> float:
    """Full-FT bytes / ROSA bytes for matrices with ratio rho under ``plan``:
    full = c_t m n, ROSA = c_f m n + c_t m n / rho  =>  c_t rho / (c_f rho + c_t).
    Stage 0 fp32 Adam (c_f = 4, c_t = 16) gives 4 rho / (rho + 4)."""
    cf, ct = coefficients(plan, where)
    return ct * rho / (cf * rho + ct)


def model_reduction(full: ModelCounts, other: ModelCounts, plan: MemoryPlan, where: str = "all") -> float:
    """Whole-model closed form: c_t P / (c_f F + c_t T), with P all parameters (full FT) and F, T
    the frozen and trainable elements of the other method. Ignores padding, ZeRO-3 persistence,
    buckets and scalars (docs/memory.md bounds their size)."""
    cf, ct = coefficients(plan, where)
    return ct * full.n_trainable / (cf * other.n_frozen + ct * other.n_trainable)


def paper_reduction(rho: float) -> float:
    """The paper's stated reduction 4 rho / (1 + rho) (omits the factors' gradient and moments)."""
    return 4 * rho / (1 + rho)


def rho_of(m: int, n: int, rank: int) -> float:
    """rho = m n / (R (m + n))."""
    if rank >= min(m, n):
        raise ConfigError(f"rank {rank} is too large for a {m}x{n} matrix; the largest valid rank is {min(m, n) - 1}")
    return m * n / (rank * (m + n))


def reduction_vs_full(full: MemoryBreakdown, other: MemoryBreakdown, where: str = "all") -> float:
    """Measured or predicted reduction of parameter-related bytes (weights, gradients, masters,
    moments) against full fine-tuning under the same stage, N and precision."""
    denom = other.state_bytes(where)
    return full.state_bytes(where) / denom if denom else math.inf
