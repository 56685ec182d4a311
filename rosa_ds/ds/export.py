"""The final model, streamed: one unit at a time is gathered, merged and appended to a safetensors
shard on rank 0, so no process ever holds the whole model.

A *unit* is what must be merged together: a ``RosaLinear`` (W_f or its fp32 master, and the fp32
masters of A and B: W = W_f + A B), a LoRA layer (passed by the recipe as ``is_unit``), or else one
parameter or persistent buffer. Units are gathered one at a time (ZeRO-3: ``GatheredParameters``,
collective, every rank in the same order); rank 0 turns each into plain-model tensors and hands
them to ``ShardWriter``, which writes a shard whenever the next tensor would push it past
``max_shard_bytes`` (a tensor larger than that gets a shard of its own, as in transformers). The
output is what ``save_pretrained`` writes: ``model.safetensors``, or ``model-0000i-of-0000N``
shards and ``model.safetensors.index.json``, beside config.json (and generation_config.json, the
tokenizer), all inside a directory that appears complete or not at all (``atomic_dir``).

Peak host memory on rank 0: one shard + one unit (+ its fp32 merge temporaries).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch

from ..errors import RosaError
from ..inject import iter_rosa_layers, merged_layer_weight, unwrap_name
from ..layer import RosaLinear, is_adapter_param
from ..utils.io import atomic_dir
from ..utils.log import log_rank0
from ..utils.safetensors_io import SafetensorsStream
from .dist import all_gather_object, barrier, device, rank_and_world, recv, send
from .params import full_fp32, gathered
from .write_guard import WriteGuard

DEFAULT_SHARD_BYTES = 50 * 10**9  # transformers' default max_shard_size, "50GB"


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each (a larger tensor gets its own), named and
    indexed as ``save_pretrained`` names them, written as tensors arrive (rank 0). ``plan`` lists
    every (name, shape, dtype) in arrival order, so each shard's header is written first and its
    tensors are streamed into it: the writer holds no tensor, whatever the shard size."""

    def __init__(self, directory: Path, max_bytes: int, plan: list[tuple[str, tuple, torch.dtype]]) -> None:
        self.directory = Path(directory)
        shards, current, size = [], [], 0
        for entry in plan:
            nbytes = int(torch.Size(entry[1]).numel()) * entry[2].itemsize
            if current and size + nbytes > max_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(entry)
            size += nbytes
        self.shards = shards + ([current] if current else [[]])
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                           for i in range(n)]
        self.total = sum(int(torch.Size(s).numel()) * d.itemsize for _, s, d in plan)
        self.dtypes = {d for _, _, d in plan if d.is_floating_point}
        self.index, self.stream = -1, None

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.stream is None or self.stream.done == len(self.shards[self.index]):
            self._next()
        self.stream.write(key, tensor)

    def _next(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.index += 1
        self.stream = SafetensorsStream(self.directory / self.names[self.index], self.shards[self.index],
                                        metadata={"format": "pt"})

    def close(self) -> list[str]:
        """Finish the last shard (and write the index if there are several)."""
        while self.index < len(self.shards) - 1:  # an empty model still gets its (empty) file
            self._next()
        self.stream.close()
        if len(self.names) > 1:
            weight_map = {name: f for f, entries in zip(self.names, self.shards) for name, _, _ in entries}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.names)


def _units(model, is_unit: Callable) -> Iterator[tuple[str, torch.nn.Module, list[tuple[str, torch.Tensor]]]]:
    """(prefix, unit module or None, [(state-dict name, tensor)]) in module order; each parameter
    once (tied weights: the first name, as ``named_parameters`` and transformers keep it)."""
    seen: set[int] = set()
    skip_below: Optional[str] = None
    persistent = set(model.state_dict().keys())
    for prefix, module in model.named_modules():
        if skip_below is not None and prefix.startswith(skip_below):
            continue
        if prefix and is_unit(module):
            tensors = [(f"{prefix}.{n}", t) for n, t in module.state_dict(keep_vars=True).items()]
            seen.update(id(t) for _, t in tensors)
            skip_below = prefix + "."
            yield prefix, module, tensors
            continue
        for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            full = f"{prefix}.{n}" if prefix else n
            if t is None or id(t) in seen or full not in persistent:
                continue
            seen.add(id(t))
            yield prefix, None, [(full, t)]


def _gather_unit(tensors: list[tuple[str, torch.Tensor]], rank: int) -> dict[str, torch.Tensor]:
    """Full values of one unit on rank 0 ({} elsewhere); collective. Trainable parameters come
    from their fp32 masters (factors stay fp32 for the merge, others take the module's dtype)."""
    out = {}
    params = [t for _, t in tensors if isinstance(t, torch.nn.Parameter)]
    with gathered([p for p in params if not p.requires_grad]):
        for name, t in tensors:
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                value = full_fp32(t)
                value = value if is_adapter_param(name) else value.to(t.dtype)
            else:
                value = t.detach()
            if rank == 0:
                out[name] = value.to("cpu", copy=True)
    return out


def _master_on_rank0(layer: RosaLinear, owners_with_master: dict[int, int], rank: int) -> Optional[torch.Tensor]:
    """The fp32 master of W_f of a bf16 / fp16 ``layer`` on rank 0, from its owner (point to point)."""
    if layer.quantized:
        return layer.base_master if rank == 0 else None
    owner = owners_with_master.get(layer.layer_index)
    if owner is None:
        return None
    if rank == owner == 0:
        return layer.base_master
    if rank == owner:
        send(layer.base_master.to(device()), dst=0)
    elif rank == 0:
        buf = torch.empty(layer.out_features, layer.in_features, dtype=torch.float32, device=device())
        return recv(buf, src=owner).cpu()
    return None


def rosa_transform(model) -> Callable:
    """Plain tensors of a ROSA model's unit: a merged ``RosaLinear`` (W = master or W_f, + A B), or
    one tensor under its plain name (None for factors and a quantized base's packed buffers)."""
    names = {id(l): n for n, l in iter_rosa_layers(model)}

    def transform(unit, values: dict, master) -> dict:
        if isinstance(unit, RosaLinear):
            name = names[id(unit)]
            out = {f"{name}.weight": merged_layer_weight(name, unit, values, master)}
            out.update({unwrap_name(k): v for k, v in values.items() if k.endswith(".bias")})
            return out
        return {plain: v for k, v in values.items() if (plain := unwrap_name(k)) is not None}

    return transform


def _meta_values(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A unit's values as ``_gather_unit`` would give them, on the meta device (shapes and dtypes only)."""
    out = {}
    for name, t in tensors:
        shape = tuple(getattr(t, "ds_shape", t.shape))
        fp32 = isinstance(t, torch.nn.Parameter) and t.requires_grad and is_adapter_param(name)
        out[name] = torch.empty(shape, dtype=torch.float32 if fp32 else t.dtype, device="meta")
    return out


def plan_plain(model, transform: Callable, is_unit: Callable, owners: dict[int, int]) -> list:
    """(plain name, shape, dtype) of every tensor the export writes, in order, from a pass on the
    meta device: nothing is gathered or computed."""
    plan = []
    for _, unit, tensors in _units(model, is_unit):
        master = None
        if isinstance(unit, RosaLinear) and (unit.quantized or unit.layer_index in owners):
            master = torch.empty(unit.out_features, unit.in_features, device="meta")
        for key, value in transform(unit, _meta_values(tensors), master).items():
            plan.append((key, tuple(value.shape), value.dtype))
    return plan


def _setup(model, transform: Optional[Callable], is_unit: Optional[Callable]):
    is_unit = is_unit or (lambda m: isinstance(m, RosaLinear))
    transform = transform or rosa_transform(model)
    held = all_gather_object([l.layer_index for _, l in iter_rosa_layers(model) if l.has_master and not l.quantized])
    owners = {i: r for r, indices in enumerate(held) for i in indices}
    return transform, is_unit, owners


class NonFiniteExport(RosaError, FloatingPointError):
    """A merged weight (W_f + A B, or any plain tensor) has non-finite values: nothing is written."""


# Pretrained transformer weights are O(1) (rarely above ~1e2); a merged weight beyond this means
# the run diverged (e.g. a learning rate orders of magnitude too high) even when it is finite.
SUSPICIOUS_MAGNITUDE = 1e4


def stream_plain(model, writer, transform: Optional[Callable] = None, is_unit: Optional[Callable] = None,
                 owners: Optional[dict] = None) -> None:
    """Gather, merge and write every unit of ``model`` (collective; ``writer`` on rank 0 only).

    Every merged tensor is checked before it is written; a non-finite one stops the writing but
    not the gathering (the other ranks stay in step), and all ranks then raise ``NonFiniteExport``
    together (the caller's temporary directory is discarded)."""
    rank, _ = rank_and_world()
    if owners is None:
        transform, is_unit, owners = _setup(model, transform, is_unit)
    bad, largest = [], (0.0, "")
    for _, unit, tensors in _units(model, is_unit):
        values = _gather_unit(tensors, rank)
        master = _master_on_rank0(unit, owners, rank) if isinstance(unit, RosaLinear) else None
        if rank != 0:
            continue
        for key, value in transform(unit, values, master).items():
            if not bool(torch.isfinite(value).all()):
                bad.append(key)
            if bad:
                continue
            if value.is_floating_point() and value.numel():
                largest = max(largest, (float(value.abs().max()), key))
            writer.add(key, value)
    bad = all_gather_object(bad)[0]
    if bad:
        raise NonFiniteExport(f"the merged weight {bad[0]} has non-finite values (W_f + A B overflowed or the "
                              "training diverged); no model was written")
    if rank == 0 and largest[0] > SUSPICIOUS_MAGNITUDE:
        log_rank0(f"warning: the exported weight {largest[1]} reaches |w| = {largest[0]:.3g}; pretrained weights are "
                  "O(1): the run has probably diverged (check the learning rate and the loss curve)")


def save_model(model, out_dir: Path, tokenizer=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
               transform: Optional[Callable] = None, is_unit: Optional[Callable] = None,
               describe=None) -> Optional[Path]:
    """Write ``model`` as a plain transformers model into ``out_dir`` (collective; rank 0 writes):
    sharded safetensors, streamed (see the module docstring). ``describe`` is the model whose
    config / generation config describe the plain model (default ``model``; a PEFT model's base).
    A write that fails (disk full, I/O error) stops rank 0's writing but not the gathering; the
    partial directory is removed and every rank raises the same ``CheckpointWriteError``."""
    rank, _ = rank_and_world()
    out_dir = Path(out_dir)
    describe = describe if describe is not None else model
    transform, is_unit, owners = _setup(model, transform, is_unit)
    guard = WriteGuard(out_dir.parent, kind="final model")
    plan = plan_plain(model, transform, is_unit, owners)
    if rank != 0:
        stream_plain(model, None, transform, is_unit, owners)
    else:
        try:
            with atomic_dir(out_dir, replace=True) as tmp:
                writer = ShardWriter(tmp, max_shard_bytes, plan)
                stream_plain(model, _Guarded(writer, guard), transform, is_unit, owners)
                guard.run(tmp, _finish, writer, describe, tokenizer, tmp)
                if guard.failure is not None:
                    raise _WriteFailed  # atomic_dir removes the partial directory
        except _WriteFailed:
            pass
    size = sum(int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in plan)
    guard.agree(out_dir, lambda: None, lambda: (size, "the model's weights"))
    barrier()
    return out_dir if rank == 0 else None


class _WriteFailed(Exception):
    """Rank 0's export met a write failure (recorded in its ``WriteGuard``)."""


class _Guarded:
    """``ShardWriter.add`` through a ``WriteGuard``: after a failure, nothing more is written."""

    def __init__(self, writer: ShardWriter, guard: WriteGuard) -> None:
        self.writer, self.guard = writer, guard

    def add(self, key: str, tensor: torch.Tensor) -> None:
        shard = self.writer.names[max(self.writer.index, 0)]
        self.guard.run(self.writer.directory / shard, self.writer.add, key, tensor)


def _finish(writer: ShardWriter, describe, tokenizer, tmp: Path) -> None:
    """The last shard, the index, the config (with the dtype written), generation config, tokenizer."""
    writer.close()
    if len(writer.dtypes) == 1:  # the dtype the weights were written in, as save_pretrained records it
        describe.config.dtype = next(iter(writer.dtypes))
    describe.config.save_pretrained(str(tmp))
    if getattr(describe, "can_generate", lambda: False)() and getattr(describe, "generation_config", None):
        describe.generation_config.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def save_merged(model, out_dir: Path, tokenizer=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Optional[Path]:
    """The final merged ROSA model as plain sharded safetensors (collective)."""
    return save_model(model, out_dir, tokenizer, max_shard_bytes)


def merged_state_dict(model) -> Optional[dict]:
    """The whole plain state dict in memory on rank 0 (None elsewhere): small models and tests
    only; exports stream (``save_model``). Collective."""
    rank, _ = rank_and_world()
    collected: dict[str, torch.Tensor] = {}

    class Collect:
        def add(self, key, tensor):
            collected[key] = tensor

    stream_plain(model, Collect() if rank == 0 else None)
    return collected if rank == 0 else None

