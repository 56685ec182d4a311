"""Measured bytes per rank: a census of a live DeepSpeed engine's own tensors.

Duck-typed (no DeepSpeed import): it reads the engine's module and optimizer attributes by
name. Every tensor is counted by its storage (so views into ZeRO's flat buffers count once,
at the storage's full size) and claimed by the first category that reaches it, in this order:
module parameters (ZeRO-3 ``ds_tensor`` partitions included) and buffers, gradients on them,
then the optimizer's named attributes, the inner optimizer's state, and finally every other
tensor reachable from the optimizer as ``other``. On the CPU accelerator memory_allocated()
is process RSS, so this census is the only exact tensor count there; on CUDA the peak from
``torch.cuda.max_memory_allocated`` is recorded too.
"""
from __future__ import annotations

import torch

from ..memory.plan import MemoryBreakdown

# Optimizer attributes by category (DeepSpeed 0.19.8 names: stage_1_and_2.py, stage3.py, bf16_optimizer.py).
WEIGHT_ATTRS = ("bit16_groups_flat", "fp16_partitioned_groups_flat", "bf16_groups_flat")
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")
GRAD_ATTRS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
              "fp32_groups_gradients_flat", "fp32_groups_gradients", "accumulated_grads_in_cpu",
              "offload_gradient_dict", "lp_grad_partitions_flat_pin_buffers")
BUCKET_ATTRS = ("ipg_buckets", "temp_grad_buffer_for_cpu_offload", "temp_grad_buffer_for_gpu_offload",
                "param_buffer_of_bit16_for_cpu_offload_groups", "ipg_bucket_flat_buffer")
MAX_DEPTH = 6


class _Census:
    def __init__(self, device_type: str, label: str) -> None:
        self.seen: set = set()
        self.out = MemoryBreakdown(label=label)
        self.device_type = device_type

    def tensor(self, t, category: str, host: bool | None = None) -> None:
        """Claim ``t``'s storage; ``host`` overrides where it lives (the quantized base's masters
        are host RAM by design, even on the CPU accelerator where both are one memory)."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr())
        if storage.data_ptr() and key not in self.seen:
            self.seen.add(key)
            self.out.add(category, storage.nbytes(), host=t.device.type != self.device_type if host is None else host)

    def walk(self, obj, category: str, depth: int = 0, grads: str | None = None) -> None:
        """Claim every tensor under ``obj`` (lists, dicts, DeepSpeed helper objects) for
        ``category``; their ``.grad`` goes to ``grads`` (default: gradients)."""
        if depth > MAX_DEPTH or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            self.tensor(obj, category)
            if getattr(obj, "grad", None) is not None:
                self.tensor(obj.grad, grads or "gradients")
            return
        if isinstance(obj, dict):
            for value in list(obj.values()):
                self.walk(value, category, depth + 1, grads)
        elif isinstance(obj, (list, tuple, set)):
            for value in list(obj):
                self.walk(value, category, depth + 1, grads)
        elif _is_helper(obj):
            for value in list(vars(obj).values()):
                self.walk(value, category, depth + 1, grads)


def _is_helper(obj) -> bool:
    """DeepSpeed's small holder objects (IPG buckets, grad-buffer groups), not modules or groups."""
    mod = type(obj).__module__ or ""
    return mod.startswith("deepspeed") and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module) \
        and not hasattr(obj, "param_groups")


def _module(c: _Census, module: torch.nn.Module) -> None:
    seen = set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        cat = "trainable_weights" if p.requires_grad else "frozen_weights"
        c.tensor(getattr(p, "ds_tensor", None), cat)  # ZeRO-3 partition
        c.tensor(p.data, cat)  # full tensor (ZeRO-1/2 view of the flat buffer, ZeRO-3 persistent)
    from ..layer import RosaLinear
    from ..quant import QuantizedBase

    for m in module.modules():  # before the generic buffers: the packed W_f has its own category
        if isinstance(m, QuantizedBase):
            for b in m.buffers():
                c.tensor(b, "quantized_weights")
        elif isinstance(m, RosaLinear) and m.has_master:
            c.tensor(m.base_master, "base_masters", host=True)
    for b in module.buffers():
        c.tensor(b, "buffers")
    for p in module.parameters():
        if p.grad is not None:
            c.tensor(p.grad, "gradients")


def _optimizer(c: _Census, opt) -> None:
    inner = getattr(opt, "optimizer", None)
    inner = inner if hasattr(inner, "param_groups") else (opt if hasattr(opt, "param_groups") else None)
    for names, cat in ((WEIGHT_ATTRS, "trainable_weights"), (MASTER_ATTRS, "master_weights"),
                       (GRAD_ATTRS, "gradients"), (BUCKET_ATTRS, "buckets")):
        for name in names:
            c.walk(getattr(opt, name, None), cat)
    if inner is not None:
        for state in inner.state.values():
            c.walk(state, "optimizer_states")
        for group in inner.param_groups:
            c.walk(group["params"], "master_weights")
    if inner is not opt and hasattr(opt, "__dict__"):
        for name, value in vars(opt).items():
            if name not in ("optimizer", "module") and not isinstance(value, torch.nn.Module):
                c.walk(value, "other", 1)


def measure(ds_engine, label: str = "measured") -> MemoryBreakdown:
    """Census of a live DeepSpeed engine (``deepspeed.initialize``'s first result, or
    RosaEngine.ds): bytes per category on this rank, each storage counted once.

    Take it after at least one optimizer step (so optimizer state exists) and after a
    backward (so gradient partitions exist): that is the resident set at the peak."""
    module = ds_engine.module
    first = next(iter(module.parameters()), None)
    device = getattr(ds_engine, "device", None)
    device_type = torch.device(device).type if device is not None else (
        first.device.type if first is not None else "cpu")
    c = _Census(device_type, label)
    _module(c, module)
    _optimizer(c, ds_engine.optimizer)
    if torch.cuda.is_available() and device_type == "cuda":
        c.out.peak_device = int(torch.cuda.max_memory_allocated())
    return c.out


def counts_from_engine(ds_engine):
    """ModelCounts exactly as DeepSpeed grouped the trainable parameters (its own group lists,
    in its order), frozen parameters and buffers of the live module; ROSA layers give rho."""
    from ..layer import RosaLinear
    from ..memory.counts import ModelCounts, _buffer_bytes, add_quantized, arch_from_config

    opt, module = ds_engine.optimizer, ds_engine.module
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    groups = next((getattr(opt, a) for a in ("bit16_groups", "fp16_groups", "bf16_groups") if getattr(opt, a, None)),
                  None)
    if groups is None:  # stage 0: the (wrapped) torch optimizer's own groups
        inner = opt if hasattr(opt, "param_groups") else opt.optimizer
        groups = [g["params"] for g in inner.param_groups]
    out = ModelCounts(groups=[[numel(p) for p in g] for g in groups if len(g)])
    seen = set()
    for p in module.parameters():
        if id(p) not in seen and not p.requires_grad:
            out.frozen.append(numel(p))
        seen.add(id(p))
    out.buffers = _buffer_bytes(module)
    for m in module.modules():
        if isinstance(m, RosaLinear):
            out.adapted.append((m.out_features, m.in_features))
            out.rank = m.rank
    add_quantized(out, module)
    if getattr(module, "config", None) is not None:
        out.arch = arch_from_config(module.config)
    return out


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
