"""Quantized storage of a frozen base weight W_f (m x n): nf4 or int8, with exact byte counts.

Pure PyTorch plus bitsandbytes (imported lazily, only when nf4 is used); no DeepSpeed here.

* ``nf4`` (QLoRA's NormalFloat-4, ``bitsandbytes.functional.quantize_4bit``): W_f is flattened
  and cut into blocks of 64 values; each block keeps its absmax (fp32) and 16-level codes packed
  two per byte:   bytes = ceil(m n / 2) + 4 ceil(m n / 64)   (~0.5625 B per weight, 1/7.1 of fp32).
  The flat 1-D layout is deliberate: bitsandbytes 0.50's CPU ``dequantize_4bit`` cuts blocks
  per ROW of a 2-D shape while ``quantize_4bit`` cuts them over the flattened tensor, so a 2-D
  (m, n) with n % 64 != 0 comes back wrong (measured: 27% relative error for 96 x 80 instead
  of 9%). With shape (m n,) both agree on every backend.
* ``int8`` (the row-wise absmax scheme of LLM.int8() / ``Linear8bitLt`` without outliers):
  q = round(127 W / s_i), s_i = max_j |W_ij| per output row i:   bytes = m n + 4 m
  (~1 B per weight, 1/4 of fp32). Plain torch: identical maths on every device, and an all-zero
  row gets scale 1 instead of bitsandbytes' division by zero (NaN).

Relative quantization error ||deq(q(W)) - W|| / ||W|| for Gaussian weights: ~9% (nf4), ~0.6%
(int8). ``QuantizedBase`` holds the packed values and scales as BUFFERS (not parameters): DeepSpeed
never casts, partitions or optimizes them, and ``module.to(device)`` moves them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

QUANT_TYPES = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax block (bitsandbytes' default for Linear4bit)
QUANT_BUFFERS = ("qdata", "qscale")  # buffer names of a QuantizedBase (never exported)


def check_kind(kind: str) -> str:
    if kind not in QUANT_TYPES:
        raise ConfigError(f"quantization {kind!r} does not exist; choose one of {', '.join(QUANT_TYPES)}")
    return kind


Shape = tuple[tuple[int, ...], torch.dtype]


def packed_shapes(m: int, n: int, kind: str) -> tuple[Shape, Shape]:
    """((shape, dtype) of the packed values, (shape, dtype) of the fp32 scales) for an (m, n) weight."""
    numel = m * n
    if check_kind(kind) == "nf4":
        return ((-(-numel // 2), 1), torch.uint8), ((-(-numel // NF4_BLOCK),), torch.float32)
    return ((m, n), torch.int8), ((m,), torch.float32)


def quantized_nbytes(m: int, n: int, kind: str) -> int:
    """Exact bytes of the stored representation of an (m, n) weight (values + scales)."""
    (vs, vd), (ss, sd) = packed_shapes(m, n, kind)
    count = lambda s: int(torch.Size(s).numel())  # noqa: E731
    return count(vs) * torch.empty(0, dtype=vd).element_size() + count(ss) * torch.empty(0, dtype=sd).element_size()


def quantize(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed values, fp32 scales) of an (m, n) weight, computed in fp32 on ``w``'s device."""
    w = w.detach().float().contiguous()
    if check_kind(kind) == "nf4":
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(w.reshape(-1), blocksize=NF4_BLOCK, quant_type="nf4")
        return q, state.absmax.float()
    scale = w.abs().amax(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero row: any scale is exact
    q = torch.round(w * (127.0 / scale[:, None])).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, m: int, n: int, kind: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (m, n) weight in ``dtype`` (fp32, bf16 or fp16) from ``quantize``'s output.

    The scales are read as fp32 whatever their storage: bitsandbytes' CUDA kernel reads ``absmax``
    as fp32 bytes, so a bf16 scale (e.g. after ``model.to(torch.bfloat16)``) would be garbage."""
    scale = scale.float()
    if check_kind(kind) == "nf4":
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState(absmax=scale, shape=torch.Size([m * n]), blocksize=NF4_BLOCK, quant_type="nf4",
                                dtype=dtype if dtype in (torch.float32, torch.bfloat16, torch.float16)
                                else torch.float32)
        return bnbf.dequantize_4bit(q, state).reshape(m, n).to(dtype)
    return (q.float() * (scale[:, None] / 127.0)).to(dtype)


class QuantizedBase(nn.Module):
    """Frozen y = x W_f^T + bias with W_f stored quantized (buffers ``qdata``, ``qscale``).

    Shapes: W_f is (m, n) = (out, in) whatever module it came from (``nn.Linear`` or the
    transposed transformers ``Conv1D``); ``source`` remembers which, so ``to_plain`` rebuilds
    the original module type with a given full-precision weight. ``bias`` stays a (frozen)
    parameter under its original name, so state-dict keys of the bias do not change.
    Forward cost: one dequantization to the input's dtype (an m x n transient) and one GEMM.
    """

    def __init__(self, m: int, n: int, kind: str, bias: Optional[nn.Parameter], source: str,
                 weight_dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features, self.kind = m, n, check_kind(kind)
        self.source, self.weight_dtype = source, weight_dtype
        (vs, vd), (ss, sd) = packed_shapes(m, n, kind)
        # not persistent: checkpoints and the export carry the fp32 master, these are re-made from it
        self.register_buffer("qdata", torch.zeros(vs, dtype=vd, device=device), persistent=False)
        self.register_buffer("qscale", torch.ones(ss, dtype=sd, device=device), persistent=False)
        self.bias = bias
        if bias is not None:
            bias.requires_grad_(False)

    @classmethod
    def from_module(cls, module: nn.Module, weight_mn: torch.Tensor, kind: str) -> QuantizedBase:
        """A quantized copy of ``module`` (``nn.Linear`` or ``Conv1D``) holding ``weight_mn`` (m, n)."""
        m, n = weight_mn.shape
        source = "linear" if isinstance(module, nn.Linear) else "conv1d"
        base = cls(m, n, kind, module.bias, source, module.weight.dtype, module.weight.device)
        base.set_weight(weight_mn)
        return base

    @torch.no_grad()
    def set_weight(self, weight_mn: torch.Tensor) -> None:
        """Quantize ``weight_mn`` (m, n) into the existing buffers, in place (same sizes always)."""
        q, scale = quantize(weight_mn.to(self.qdata.device), self.kind)
        self.qdata.copy_(q.reshape(self.qdata.shape))
        self.qscale.copy_(scale)

    def _apply(self, fn, recurse: bool = True):
        """``module.to(dtype)`` would cast floating buffers: the scales follow device moves only and
        stay fp32, unrounded (see ``dequantize``)."""
        scale = self._buffers.pop("qscale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["qscale"] = scale.to(device=fn(scale.new_empty(0)).device)
        return self

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """deq(W_f) as (m, n) in ``dtype``."""
        return dequantize(self.qdata, self.qscale, self.out_features, self.in_features, self.kind, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight(x.dtype), bias)

    @property
    def nbytes(self) -> int:
        return quantized_nbytes(self.out_features, self.in_features, self.kind)

    @torch.no_grad()
    def to_plain(self, weight_mn: torch.Tensor) -> nn.Module:
        """The original module type holding ``weight_mn`` (m, n), cast once to the original dtype."""
        m, n = self.out_features, self.in_features
        dev = self.qdata.device
        if self.source == "linear":
            plain = nn.Linear(n, m, bias=self.bias is not None, device=dev, dtype=self.weight_dtype)
            plain.weight.copy_(weight_mn)
        else:
            from transformers.pytorch_utils import Conv1D

            plain = Conv1D(m, n).to(device=dev, dtype=self.weight_dtype)
            plain.weight.copy_(weight_mn.t())
        if self.bias is not None:
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"m={self.out_features}, n={self.in_features}, kind={self.kind}, bytes={self.nbytes}"
