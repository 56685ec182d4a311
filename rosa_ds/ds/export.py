"""The final model: every parameter gathered one at a time, W = W_f + A B merged, written as a
plain transformers model (safetensors) that ``AutoModel*.from_pretrained`` loads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..inject import iter_rosa_layers
from ..inject import merged_state_dict as merge_plain
from ..layer import is_adapter_param
from ..utils.io import atomic_dir
from .dist import all_gather_object, barrier, device, rank_and_world, recv, send
from .params import full_fp32, gathered


def full_state_dict(model) -> Optional[dict]:
    """The module's full state dict on rank 0 (None elsewhere), one parameter gathered at a time
    (collective). Trainable parameters come from their fp32 masters; factors stay fp32 for the
    merge, other trainable parameters take the module's dtype."""
    rank, _ = rank_and_world()
    full = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = full_fp32(p)
            if not is_adapter_param(name):
                value = value.to(p.dtype)
        else:
            with gathered([p]):
                value = p.detach().clone() if rank == 0 else None
        if rank == 0:
            full[name] = value.cpu()
    if rank != 0:
        return None
    keys = set(model.state_dict().keys())
    full.update({n: b.detach().cpu() for n, b in model.named_buffers() if n in keys})
    return full


def masters_on_rank0(model) -> dict[str, torch.Tensor]:
    """The fp32 masters of bf16 / fp16 W_f, which only their owners hold, on rank 0 (collective:
    one point-to-point transfer per layer owned elsewhere; {} on other ranks)."""
    rank, _ = rank_and_world()
    named = list(iter_rosa_layers(model))
    held = all_gather_object([l.layer_index for _, l in named if l.has_master and not l.quantized])
    out = {}
    for owner, indices in enumerate(held):
        for name, layer in (nl for nl in named if nl[1].layer_index in set(indices)):
            if rank == owner == 0:
                out[name] = layer.base_master
            elif rank == owner:
                send(layer.base_master.to(device()), dst=0)
            elif rank == 0:
                buf = torch.empty(layer.out_features, layer.in_features, dtype=torch.float32, device=device())
                out[name] = recv(buf, src=owner).cpu()
    return out


def merged_state_dict(model) -> Optional[dict]:
    """Full plain-model state dict on rank 0 (None elsewhere); factors from the fp32 masters of
    A and B, and W_f from its fp32 master where one is kept (quantized base, or ``frozen_master``):
    W = master + A B, merged in fp32 and rounded once to the stored dtype."""
    full = full_state_dict(model)
    if not any(True for _ in iter_rosa_layers(model)):
        return full
    masters = masters_on_rank0(model)
    return None if full is None else merge_plain(full, model, masters)


def save_model(model, state: Optional[dict], out_dir: Path, tokenizer=None) -> Optional[Path]:
    """Rank 0 writes ``model``'s architecture with ``state`` as plain safetensors into ``out_dir``,
    atomically (the directory appears complete or not at all); every rank waits for it."""
    rank, _ = rank_and_world()
    if rank == 0:
        with atomic_dir(Path(out_dir), replace=True) as tmp:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    barrier()
    return Path(out_dir) if rank == 0 else None


def save_merged(model, out_dir: Path, tokenizer=None) -> Optional[Path]:
    """The final merged ROSA model as plain safetensors (collective)."""
    return save_model(model, merged_state_dict(model), out_dir, tokenizer)
