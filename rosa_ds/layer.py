"""RosaLinear: a frozen base projection plus trainable low-rank factors.

For a logical weight W (m x n, out x in) split as W = W_f + A B:

    y = x W_f^T + bias + (x B^T) A^T          x: (..., n), y: (..., m)

The base module keeps its own class and parameter layout (``nn.Linear`` stores W as (m, n);
transformers' ``Conv1D`` stores W^T as (n, m)), now holding W_f and frozen. ``rosa_A`` (m x R)
and ``rosa_B`` (R x n) are the only new parameters. Their Parameter objects never change across
resamples (only their values do): DeepSpeed fixes the set of trainable parameters, their flat
buffers and optimizer state at initialize time.

Quantized base (``quantize="nf4" | "int8"``): the base module is replaced by a ``QuantizedBase``
holding Q(W_f) in buffers, and the full-precision master of W_f, ``base_master`` (m x n fp32 on
the host CPU), is a plain attribute: neither a parameter nor a buffer, so DeepSpeed never moves,
casts or partitions it. Every write sets the master and re-quantizes FROM it:

    master' = (master + A B) - A' B'        (fp32; A B from the fp32 factors)
    stored  = Q(master')

so the stored weight always carries the error of ONE quantization of the current W_f,
||deq(Q(W_f)) - W_f|| <= eps ||W_f||, however many resamples came before; nothing learned in A B
is rounded away (re-quantizing deq(Q(W_f)) + A B instead would drop every update smaller than
half a quantization step, and add a fresh rounding error at every resample).

The same master serves a W_f stored in bf16 / fp16 (``set_master``; the DeepSpeed seam keeps it
on the rank that factorizes the layer): merges read and write the fp32 master, and the module's
W_f is the master rounded once, so bf16 rounding never accumulates over resamples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .factorize import Factors, merge_weight
from .quant import QuantizedBase, check_kind

ADAPTER_PREFIX = "rosa_"  # name-prefix contract: every adapter parameter's own name starts with it


def is_adapter_param(name: str) -> bool:
    """True for a ROSA factor (``...rosa_A`` / ``...rosa_B``), by the leaf of its dotted name.
    The one test of the prefix contract: a module path that merely contains "rosa_" does not match."""
    return name.rsplit(".", 1)[-1].startswith(ADAPTER_PREFIX)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the pure method
        return None
    return Conv1D


def is_supported(module: nn.Module) -> bool:
    """Modules ROSA can adapt: ``nn.Linear`` and transformers' ``Conv1D``."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """Logical (out, in) = (m, n) shape of a supported module's weight."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    # Conv1D: weight is (in, out), nf = out; a ZeRO-3 partitioned weight keeps its shape in ds_shape
    return module.nf, getattr(module.weight, "ds_shape", module.weight.shape)[0]


class RosaLinear(nn.Module):
    """ROSA wrapper around an ``nn.Linear`` or ``Conv1D``.

    Args:
        base_layer: the module to adapt; kept as ``self.base_layer`` (frozen, holds W_f).
        rank: R.
        layer_index: position among the model's ROSA layers; seeds its subspace draws.
        quantize: ``None`` (W_f in the base module's own parameter) or ``"nf4"`` / ``"int8"``
            (W_f quantized in a ``QuantizedBase``, fp32 master on the host; see the module docstring).
    """

    def __init__(self, base_layer: nn.Module, rank: int, layer_index: int, quantize: str | None = None) -> None:
        super().__init__()
        if not is_supported(base_layer):
            raise ConfigError(f"ROSA cannot adapt {type(base_layer).__name__}; "
                              "supported: nn.Linear, transformers Conv1D")
        self.base_layer = base_layer
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D stores W^T
        self.out_features, self.in_features = weight_shape(base_layer)
        self.rank = rank
        self.layer_index = layer_index
        w = base_layer.weight
        self.rosa_A = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        self.rosa_B = nn.Parameter(torch.zeros(rank, self.in_features, dtype=w.dtype, device=w.device))
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.base_master: torch.Tensor | None = None  # fp32 (m, n) on the host: quantized or mastered W_f
        if quantize is not None:
            self.quantize_base(quantize)

    def quantize_base(self, kind: str) -> None:
        """Replace the base by a ``QuantizedBase`` of W_f, its fp32 master kept on the host (call
        with the base weight readable, e.g. gathered under ZeRO-3)."""
        check_kind(kind)
        # the master is a plain attribute (not registered): DeepSpeed must never see it
        self.base_master = self.frozen_weight().detach().to("cpu", torch.float32, copy=True)
        self.base_layer = QuantizedBase.from_module(self.base_layer, self.base_master, kind)

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, QuantizedBase)

    @property
    def has_master(self) -> bool:
        """True if this process holds an fp32 master of W_f (quantized base, or ``set_master``)."""
        return self.base_master is not None

    @torch.no_grad()
    def set_master(self, w_frozen: torch.Tensor) -> None:
        """Keep ``w_frozen`` (m, n) as the fp32 master of W_f in host RAM, and the module's W_f as
        it rounded once. From now on merges read the master (``frozen_weight``) and writes update
        it first (``write_frozen``)."""
        self.base_master = w_frozen.detach().to("cpu", torch.float32, copy=True).contiguous()
        self.write_frozen(self.base_master)

    def restore_master(self, master: torch.Tensor) -> None:
        """Take ``master`` (m, n) as the fp32 master without writing the module (a checkpoint
        restores the module's W_f itself)."""
        self.base_master = master.detach().to("cpu", torch.float32, copy=True).contiguous()

    def drop_master(self) -> None:
        """Forget the master of a bf16 / fp16 W_f (a quantized base keeps its own)."""
        if not self.quantized:
            self.base_master = None

    def frozen_params(self) -> list[nn.Parameter]:
        """Parameters that hold W_f (what ZeRO-3 must gather to read it): none for a quantized base."""
        return [] if self.quantized else [self.base_layer.weight]

    def frozen_tensors(self) -> list[torch.Tensor]:
        """The tensors W_f lives in on this rank (finiteness checks): the master, or the weight."""
        return [self.base_master] if self.has_master else [self.base_layer.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin GEMMs (n -> R -> m) instead of materialising A B (m x n): the point of ROSA.
        return self.base_layer(x) + F.linear(F.linear(x.to(self.rosa_B.dtype), self.rosa_B), self.rosa_A).to(x.dtype)

    # --- values in the logical (m, n) orientation -------------------------------------------
    def frozen_weight(self) -> torch.Tensor:
        """W_f as (m, n): a view for Linear, a transposed view for Conv1D; where this process holds
        an fp32 master, the master on the factors' device (not the rounded or dequantized weight
        the forward uses)."""
        if self.has_master:
            return self.base_master.to(self.rosa_A.device)
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def delta_weight(self) -> torch.Tensor:
        """A B in fp32, (m, n)."""
        return self.rosa_A.detach().float() @ self.rosa_B.detach().float()

    def merged_weight(self) -> torch.Tensor:
        """W = W_f + A B as fp32 (m, n), accumulated in fp64 and rounded once (the distributed
        resample merges with the same function)."""
        return merge_weight(self.frozen_weight().detach(), self.rosa_A.detach(), self.rosa_B.detach())

    def check_finite(self, name: str = "") -> None:
        """Refuse to merge NaN/Inf: a merge would bake them into the frozen weight for good."""
        for label, t in (("W_f", self.frozen_tensors()[0]), ("rosa_A", self.rosa_A), ("rosa_B", self.rosa_B)):
            if not torch.isfinite(t).all():
                raise FloatingPointError(
                    f"ROSA layer {name or self.layer_index}: {label} has non-finite values; refusing to merge "
                    "(lower the learning rate, enable gradient clipping, or resume from an earlier checkpoint)"
                )

    @torch.no_grad()
    def write(self, factors: Factors) -> None:
        """Copy new (W_f, A, B) into the existing parameters, in place, casting once.

        ``copy_`` (never rebinding ``.data``): under ZeRO-1/2 a parameter is a view into a
        flat buffer, and rebinding would silently detach it from what the optimizer updates.
        """
        self.write_frozen(factors.w_frozen)
        self.write_factors(factors.a, factors.b)

    @torch.no_grad()
    def write_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy A (m x R) and B (R x n) into the existing parameters, casting once."""
        self.rosa_A.copy_(a)
        self.rosa_B.copy_(b)

    @torch.no_grad()
    def write_frozen(self, w_frozen: torch.Tensor) -> None:
        """Set W_f (m, n): into the base weight, or into the master and then from it into its
        quantization or its rounded copy."""
        if self.has_master:
            if w_frozen is not self.base_master:
                self.base_master.copy_(w_frozen.detach().float())
            w_frozen = self.base_master
            if self.quantized:
                self.base_layer.set_weight(self.base_master)
                return
        self.base_layer.weight.copy_(w_frozen.t() if self.transposed else w_frozen)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold A B into W_f and zero the factors (the output is unchanged)."""
        self.check_finite()
        self.write_frozen(self.merged_weight())
        self.rosa_A.zero_()
        self.rosa_B.zero_()

    def extra_repr(self) -> str:
        quant = f", quantize={self.base_layer.kind}" if self.quantized else ""
        return f"m={self.out_features}, n={self.in_features}, rank={self.rank}, layer_index={self.layer_index}{quant}"
