"""RosaLinear: a frozen base projection plus trainable low-rank factors.

For a logical weight W (m x n, out x in) split as W = W_f + A B:

    y = x W_f^T + bias + (x B^T) A^T          x: (..., n), y: (..., m)

The base module keeps its own class and parameter layout (``nn.Linear`` stores W as (m, n);
transformers' ``Conv1D`` stores W^T as (n, m)), now holding W_f and frozen. ``rosa_A`` (m x R)
and ``rosa_B`` (R x n) are the only new parameters. Their Parameter objects never change across
resamples (only their values do): DeepSpeed fixes the set of trainable parameters, their flat
buffers and optimizer state at initialize time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .factorize import Factors

ADAPTER_PREFIX = "rosa_"  # name-prefix contract: every adapter parameter name contains it


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
    return module.nf, module.weight.shape[0]  # Conv1D: weight is (in, out), nf = out


class RosaLinear(nn.Module):
    """ROSA wrapper around an ``nn.Linear`` or ``Conv1D``.

    Args:
        base_layer: the module to adapt; kept as ``self.base_layer`` (frozen, holds W_f).
        rank: R.
        layer_index: position among the model's ROSA layers; seeds its subspace draws.
    """

    def __init__(self, base_layer: nn.Module, rank: int, layer_index: int) -> None:
        super().__init__()
        if not is_supported(base_layer):
            raise TypeError(f"ROSA cannot adapt {type(base_layer).__name__}; supported: nn.Linear, transformers Conv1D")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin GEMMs (n -> R -> m) instead of materialising A B (m x n): the point of ROSA.
        return self.base_layer(x) + F.linear(F.linear(x.to(self.rosa_B.dtype), self.rosa_B), self.rosa_A).to(x.dtype)

    # --- values in the logical (m, n) orientation -------------------------------------------
    def frozen_weight(self) -> torch.Tensor:
        """W_f as (m, n) (a view for Linear, a transposed view for Conv1D)."""
        w = self.base_layer.weight
        return w.t() if self.transposed else w

    def delta_weight(self) -> torch.Tensor:
        """A B in fp32, (m, n)."""
        return self.rosa_A.detach().float() @ self.rosa_B.detach().float()

    def merged_weight(self) -> torch.Tensor:
        """W = W_f + A B, computed in fp32, (m, n). Merge in fp32 and cast once."""
        return self.frozen_weight().detach().float() + self.delta_weight()

    def check_finite(self, name: str = "") -> None:
        """Refuse to merge NaN/Inf: a merge would bake them into the frozen weight for good."""
        for label, t in (("W_f", self.base_layer.weight), ("rosa_A", self.rosa_A), ("rosa_B", self.rosa_B)):
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
        wf = factors.w_frozen.t() if self.transposed else factors.w_frozen
        self.base_layer.weight.copy_(wf)
        self.rosa_A.copy_(factors.a)
        self.rosa_B.copy_(factors.b)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold A B into W_f and zero the factors (the output is unchanged)."""
        self.check_finite()
        merged = self.merged_weight()
        self.base_layer.weight.copy_(merged.t() if self.transposed else merged)
        self.rosa_A.zero_()
        self.rosa_B.zero_()

    def extra_repr(self) -> str:
        return f"m={self.out_features}, n={self.in_features}, rank={self.rank}, layer_index={self.layer_index}"
