"""Partitioned loading for ZeRO-3: no rank ever holds the whole model.

The model is built empty under ``deepspeed.zero.Init`` (each module's parameters are partitioned
as it is constructed: one module at a time exists in full), then every rank reads from the
safetensors files only the bytes of its own partition of each parameter, straight into its
``ds_tensor`` (``os.pread`` at the tensor's offset; no mmap of the whole file, no gather, no
broadcast): rank r of N holds elements [r p, (r + 1) p) of the flattened parameter, p = ceil(numel / N),
zero-padded at the end, which is DeepSpeed's partitioning. Peak host memory per rank: its 1/N of
the model plus one parameter's slice in the file's dtype. Parameters the files do not have (a new
classification head) are initialized by the model's own ``_init_weights``, gathered to rank 0.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
from torch import nn

from ..errors import InputNotFound
from .dist import rank_and_world
from .zero_init import ZeroInit

# safetensors dtype names -> torch dtypes (the ones transformers checkpoints use)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class TensorIndex:
    """Where every tensor of a set of safetensors files lies: (path, dtype, shape, byte offset)."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int]] = {}
        for path in files:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key != "__metadata__":
                    self.entries[key] = (Path(path), SAFETENSORS_DTYPES[info["dtype"]], info["shape"],
                                         8 + size + info["data_offsets"][0])

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor ``key``, flattened, in its stored dtype."""
        path, dtype, shape, offset = self.entries[key]
        numel = int(torch.Size(shape).numel())
        count = numel - start if count is None else count
        item = dtype.itemsize
        out = torch.empty(count, dtype=dtype, device="cpu")  # a host staging buffer, by design
        if count:
            with open(path, "rb", buffering=0) as f:
                view = memoryview(out.view(torch.uint8).numpy())
                done = 0
                while done < count * item:  # pread may return short reads on large requests
                    done += os.preadv(f.fileno(), [view[done:]], offset + start * item + done)
        return out


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a transformers model directory (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise InputNotFound(f"{model_dir} has no model.safetensors; partitioned ZeRO-3 loading reads safetensors "
                            "(convert the checkpoint with save_pretrained(safe_serialization=True))")
    return [single]


@torch.no_grad()
def fill_partition(param: torch.Tensor, index: TensorIndex, key: str) -> None:
    """Copy this rank's partition of tensor ``key`` into the ZeRO-3 parameter's ``ds_tensor``."""
    part = param.ds_tensor.numel()
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    start = rank * part
    count = max(0, min(part, param.ds_numel - start))
    local = param.ds_tensor.view(-1)
    local[:count].copy_(index.read(key, start, count))
    local[count:].zero_()


class _InitWithoutSync(ZeroInit):
    """``zero.Init`` that does not broadcast every new parameter from rank 0 before partitioning it:
    each value is overwritten from the checkpoint (or initialized on rank 0 and scattered by
    ``_init_missing``), so the broadcast would only cost a full-size transfer and buffer per
    parameter. Overrides one step of DeepSpeed 0.19.8's ``Init._zero_init_param``."""

    def _zero_init_param(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()


def load_partitioned(build: Callable[[], nn.Module], model_dir: Path, ds_config: dict,
                     dtype: torch.dtype) -> nn.Module:
    """Build ``build()`` under ``zero.Init`` (partitioned, in ``dtype``) and fill every rank's
    partitions from ``model_dir``'s safetensors (see the module docstring). Collective."""
    import torch._dynamo  # noqa: F401  (imported inside zero.Init, which patches Tensor.__new__, it fails)
    from transformers import initialization

    with _InitWithoutSync(config_dict_or_path=ds_config, dtype=dtype), initialization.no_init_weights():
        model = build()
    if hasattr(model, "tie_weights"):  # no_init_weights skips the tying too: the LM head is the embedding
        model.tie_weights()
    index = TensorIndex(model_files(Path(model_dir)))
    missing = []
    for name, param in model.named_parameters():
        key = _checkpoint_key(name, index, model)
        shape = list(getattr(param, "ds_shape", param.shape))
        if key is None or index.entries[key][2] != shape:  # absent, or a head of another size: initialize
            missing.append(name)
        elif hasattr(param, "ds_id"):
            fill_partition(param, index, key)
        else:
            param.data.copy_(index.read(key).view(param.shape))
    loaded = set()
    for name, buf in model.named_buffers():
        key = _checkpoint_key(name, index, model)
        if key is not None:
            buf.copy_(index.read(key).view(buf.shape))
            loaded.add(name)
    _init_missing(model, missing)
    restore_buffer_dtypes(model, build, loaded)
    return model


def restore_buffer_dtypes(model: nn.Module, build: Callable[[], nn.Module], loaded: set) -> list[str]:
    """Give every buffer the dtype the model means it to have; returns the names changed.

    ``zero.Init`` turns every floating tensor built inside it into the training dtype, buffers a
    model builds in fp32 on purpose included: a rotary embedding's ``inv_freq`` in bf16 moves every
    position's angle (0.6% of a tiny Llama's logits against ``from_pretrained``). The model built
    again on the meta device, outside ``zero.Init`` (no memory, no values), says which dtype each
    buffer is meant to have; a buffer the checkpoint did not fill is then recomputed by the model's
    own ``_init_weights`` of its module, for modules that hold no parameters (a norm's init would
    reset its weights)."""
    with torch.device("meta"):
        meant = {name: buf.dtype for name, buf in build().named_buffers()}
    modules = dict(model.named_modules())
    changed, recompute = [], {}
    for name, buf in list(model.named_buffers()):
        if meant.get(name, buf.dtype) == buf.dtype:
            continue
        owner, _, leaf = name.rpartition(".")
        modules[owner]._buffers[leaf] = buf.detach().to(meant[name])  # the persistence flag is kept
        changed.append(name)
        if name not in loaded and not any(True for _ in modules[owner].parameters(recurse=False)):
            recompute[owner] = modules[owner]
    init = getattr(model, "_init_weights", None)
    for module in recompute.values() if init is not None else ():
        init(module)
    return changed


def _checkpoint_key(name: str, index: TensorIndex, model: nn.Module) -> str | None:
    """The checkpoint key of parameter ``name`` (as saved, or under the base model's prefix)."""
    if name in index.entries:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in index.entries:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in index.entries:
        return f"{prefix}.{name}"
    return None


def _init_missing(model: nn.Module, missing: list[str]) -> None:
    """Initialize the parameters the checkpoint lacks with the model's own ``_init_weights``
    (rank 0 writes, gathered one module at a time; every rank calls this with the same list)."""
    rank, _ = rank_and_world()
    owners = {name.rpartition(".")[0] for name in missing}
    for module_name, module in model.named_modules():
        if module_name not in owners:
            continue
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                model._init_weights(module)
