"""Bring a model into the state DeepSpeed is built on: ROSA layers factorized once in the world,
fp32 masters of W_f on their owners. Shared by ``rosa_ds.initialize`` and the Trainer integration
(``rosa_ds.hf``), which must hand DeepSpeed the same model.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from torch import nn

from ..config import RosaConfig
from ..inject import apply_rosa, iter_rosa_layers, mark_trainable
from ..owners import assign_owners
from .config import precision
from .dist import device, rank_and_world
from .params import gathered, is_zero3
from .resample import distributed_resample, uses_frozen_masters
from .zero_init import ZeroInit


def resolve_frozen_master(config: RosaConfig, ds_config: dict) -> RosaConfig:
    """``frozen_master=None`` -> on exactly when the DeepSpeed config trains in bf16 or fp16."""
    if config.frozen_master is not None:
        return config
    return dataclasses.replace(config, frozen_master=precision(ds_config) in ("bf16", "fp16"))


def place_masters(model: nn.Module, mastered: bool) -> None:
    """fp32 masters of W_f on the layers' owners only (a model ROSA was applied to in one process
    may hold them on every rank, or none): owners keep or create theirs, other ranks drop theirs."""
    rank, world = rank_and_world()
    layers = [l for _, l in iter_rosa_layers(model)]
    owners = assign_owners(layers, world)
    for layer in layers:
        if layer.quantized:
            continue
        if mastered and owners[layer.layer_index] == rank:
            if not layer.has_master:
                layer.set_master(layer.frozen_weight().detach())
        else:
            layer.drop_master()


def _apply_unfactorized(model: nn.Module, config: RosaConfig, ds_config: dict) -> None:
    """ROSA layers with W_f = W, A = B = 0. On a model loaded partitioned (ZeRO-3, ``rosa_ds.ds.load``)
    the new factors are created partitioned too (``zero.Init``), so the first factorization runs
    on the partitioned path, one round of layers at a time, and a quantized base gathers each
    weight once to quantize it."""
    if not any(is_zero3(p) for p in model.parameters()):
        apply_rosa(model, config, factorize=False)
        return
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with ZeroInit(config_dict_or_path=ds_config, dtype=dtype):
        apply_rosa(model, dataclasses.replace(config, quantize_base=None), factorize=False)
    model.rosa_config = config
    if config.quantize_base is not None:
        _quantize_outside_zero_init(model, config.quantize_base)


def _quantize_outside_zero_init(model: nn.Module, kind: str) -> None:
    """Quantize each (gathered) base outside any ``zero.Init`` context: its patched tensor
    constructors turn every floating tensor made inside into the training dtype, bitsandbytes'
    fp32 absmax included, which its CUDA kernel then fills with fp32 through a raw pointer (twice
    the bf16 buffer's bytes: an out-of-bounds write); the scales would also be stored rounded.
    ``shutdown_init_context`` lifts an enclosing context too, ``restore_init_context`` puts it back."""
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        for _, layer in iter_rosa_layers(model):
            with gathered(list(layer.base_layer.parameters())):
                layer.quantize_base(kind)
    finally:
        restore_init_context()


def _to_accelerator(model: nn.Module) -> None:
    """Move a model that is not yet on this rank's accelerator there, before the first
    factorization: the seam computes with the model's tensors and the ones it makes on
    ``device()``, which must be one device (a CPU-loaded model on a GPU rank would mix them).
    ZeRO-3 partitions (``ds_tensor``) are placed by DeepSpeed already and left alone."""
    dev = device()
    if any(p.device != dev and not hasattr(p, "ds_id") for p in model.parameters()):
        model.to(dev)


def prepare_model(model: nn.Module, rosa_config: Optional[RosaConfig], ds_config: dict) -> Optional[RosaConfig]:
    """Apply ROSA to ``model`` (or adopt the ROSA layers it has) before DeepSpeed wraps it;
    returns the resolved config (None: no ROSA, plain training).

    A plain model gets W_f = W, A = B = 0 layers, then one distributed factorization (resample
    index 0: one SVD per layer in the world, the owners' fp32 masters of W_f). A model that has
    ROSA layers keeps them; its masters are moved to the layers' owners. Collective when the
    process group exists."""
    has_rosa = any(True for _ in iter_rosa_layers(model))
    _to_accelerator(model)
    given = rosa_config
    if has_rosa and rosa_config is None:
        rosa_config = model.rosa_config
    if rosa_config is not None:
        rosa_config = resolve_frozen_master(rosa_config, ds_config)
    if rosa_config is not None and not has_rosa:
        _apply_unfactorized(model, rosa_config, ds_config)  # W_f = W, A = B = 0: same function
        distributed_resample(model, rosa_config, 0)  # one SVD per layer in the world; owners' W_f masters
    elif has_rosa:
        if given is not None:
            mark_trainable(model, rosa_config)
        place_masters(model, uses_frozen_masters(rosa_config))
    return rosa_config
