"""Activation census: the bytes autograd keeps for backward during one micro step, measured.

Every tensor an autograd node saves passes through ``torch.autograd.graph.saved_tensors_hooks``'
pack hook; the census records its storage (deduplicated by storage, so q/k/v views of one fused
projection or a residual saved by two ops count once) and attributes it to the transformer layer
running at the time, or to ``before`` (embeddings) / ``after`` (final norm, head, loss).
Parameter and buffer storages are not activations and are skipped.

With non-reentrant activation checkpointing the checkpoint installs its own (inner) hooks, so
what a checkpointed layer saves never reaches ours: what the layer keeps is its inputs, held by
the checkpoint's recompute closure. The census counts those (``checkpoint_inputs``) through a
pre-forward hook on each layer with checkpointing on. During backward one layer at a time is
recomputed with its full activations: ``recompute_peak`` is the largest layer's census without
checkpointing (measured by the caller with checkpointing off; see ``predict_peak``).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class ActivationCensus:
    """Bytes saved for backward in one micro step.

    Attributes:
        layers: bytes attributed to each transformer layer, in order.
        before: bytes saved before the first layer (embeddings, masks, rotary tables).
        after: bytes saved after the last layer (final norm, head, logits, loss).
        checkpoint_inputs: of ``layers``, the bytes kept as checkpointed layers' inputs.
        by_dtype: total bytes per dtype name (e.g. ``float32``, ``bool``).
    """

    layers: list = field(default_factory=list)
    before: int = 0
    after: int = 0
    checkpoint_inputs: int = 0
    by_dtype: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.before + sum(self.layers) + self.after

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "before": self.before, "after": self.after,
                "checkpoint_inputs": self.checkpoint_inputs, "by_dtype": dict(self.by_dtype), "total": self.total}


def transformer_layers(model: nn.Module, required: bool = True) -> list:
    """The repeated blocks: the children of the longest ``nn.ModuleList`` whose members share one
    class (``model.layers``, ``transformer.h``, ``encoder.layer``); ``required=False``: an empty
    list when there is none (the census then has only ``before``)."""
    best: list = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) \
                and len({type(m) for m in module}) == 1:
            best = list(module)
    if not best and required:
        raise ConfigError(f"{type(model).__name__} has no list of repeated layers; the activation census needs "
                          "a transformer with its blocks in an nn.ModuleList")
    return best


class _Recorder:
    """Pack hook + layer tracking: storage -> (bytes, where) for every saved storage."""

    def __init__(self, model: nn.Module, layers: list) -> None:
        self.skip = {self._key(t) for t in list(model.parameters()) + list(model.buffers())}
        self.index = {id(m): i for i, m in enumerate(layers)}
        self.layers, self.current, self.done = layers, None, False
        self.seen: dict = {}  # storage key -> (nbytes, where, dtype, from a checkpoint input)
        self.handles: list = []

    @staticmethod
    def _key(t: torch.Tensor):
        return (t.device, t.untyped_storage().data_ptr()) if t.numel() else None

    def where(self):
        if self.current is not None:
            return self.current
        return "after" if self.done else "before"

    def add(self, t: torch.Tensor, where, checkpoint_input: bool = False) -> None:
        key = self._key(t)
        if key is None or key in self.skip or key in self.seen:
            return
        self.seen[key] = (t.untyped_storage().nbytes(), where, str(t.dtype).replace("torch.", ""), checkpoint_input)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):  # a weight kept for the input's gradient (ZeRO-3: gathered)
            self.add(t, self.where())
        return t

    def attach(self) -> None:
        for layer in self.layers:
            self.handles.append(layer.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, module, args, kwargs):
        i = self.index[id(module)]
        self.current = i
        if getattr(module, "gradient_checkpointing", False) and module.training:
            for t in list(args) + list(kwargs.values()):
                if isinstance(t, torch.Tensor):
                    self.add(t, i, checkpoint_input=True)
                elif isinstance(t, (tuple, list)):  # e.g. (cos, sin) position embeddings
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self.add(u, i, checkpoint_input=True)

    def _leave(self, module, args, output):
        self.current = None
        if self.index[id(module)] == len(self.layers) - 1:
            self.done = True

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def census(model: nn.Module):
    """Record what autograd saves while the block runs (a forward that builds the graph).
    Yields an ``ActivationCensus`` filled when the block exits."""
    layers = transformer_layers(model, required=False)
    rec, out = _Recorder(model, layers), ActivationCensus(layers=[0] * len(layers))
    rec.attach()
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            yield out
    finally:
        rec.detach()
    for nbytes, where, dtype, ckpt in rec.seen.values():
        if where == "before":
            out.before += nbytes
        elif where == "after":
            out.after += nbytes
        else:
            out.layers[where] += nbytes
        out.checkpoint_inputs += nbytes if ckpt else 0
        out.by_dtype[dtype] = out.by_dtype.get(dtype, 0) + nbytes


def measure_activations(model: nn.Module, batch: dict, loss_of: Optional[Callable] = None) -> ActivationCensus:
    """Census of one training micro step of ``model`` on ``batch``: forward (train mode) under the
    census, then backward so the graph is consumed as in training. ``loss_of(outputs)`` defaults
    to ``outputs.loss``."""
    model.train()
    with census(model) as out:
        outputs = model(**batch)
        loss = loss_of(outputs) if loss_of else outputs.loss
    loss.backward()
    return out
