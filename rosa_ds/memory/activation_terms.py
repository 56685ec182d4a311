"""Predicted activation bytes, term by term, per architecture family (calibrated by the census).

Each term is what one autograd node keeps for backward, read from the models' code in
transformers 5.23 and checked tensor by tensor with ``rosa_ds.memory.activations`` (the census;
``tests/unit/test_activations.py`` holds every family to it, ``bench/activations.py`` the real
models). Notation, per token (b s of them per micro step): h hidden, d head size, a heads,
g = kv heads x d, f MLP width, V vocabulary, R rank, t adapted matrices per layer;
w bytes per activation (4 fp32, 2 bf16/fp16); norm statistics, attention log-sum-exp and the
loss's log-softmax are fp32 whatever w; a dropout keeps its mask: 1 byte on CUDA (fused
kernel), w on the CPU (a noise tensor). "Trainable" linears (full fine-tuning, or adapters'
B / lora_A) keep their input; a frozen one keeps nothing but its weight (not an activation).

Families (a general layer; the first layer under adapters keeps less: its input needs no
gradient, so its first norm keeps nothing of its own):

* ``llama`` (RMSNorm, rotary, SwiGLU): per norm 4h (the fp32 upcast of its input) + 4 (rsqrt)
  + w h (its output, the next linears' input) [+ w h normalised input when its weight trains];
  attention, sdpa: w (2h + 2g) (rotated q, k, v, output) + 4a (log-sum-exp); eager:
  w 4h (q and k, v repeated to a heads, output) + a s (4 + w if w < 4: fp32 softmax and its
  cast); MLP 4 w f (gate, SiLU, up, product); rotary cos / sin once: 2 s d w.
* ``gpt2`` (pre-LN, fused c_attn, gelu_new, dropout): per LayerNorm w h + 8 (input, mean,
  rstd) + w h output; attention with dropout on the CPU or eager (math kernel): w (4h + 3 a s)
  (q, k, v, output; softmax, dropout noise, dropped probabilities), else (flash) w 4h + 4a;
  residual dropouts 2 h m; MLP 5 w f (gelu_new's tanh form keeps four f-sized tensors, c_proj
  its input).
* ``bert`` (post-LN, GELU, dropout): input w h, attention as gpt2, output dropouts 2 h m,
  LayerNorms 2 (w h + 8) and the first one's output w h, MLP 2 w f.

Plus adapters' R-wide intermediates w R t per layer, embeddings' dropout and ids, and the head:
the final norm, the loss's fp32 log-softmax 4 V and int64 targets; under full fine-tuning the
head's input. With activation checkpointing a layer keeps only its input, w h, plus inputs
shared by all layers (cos / sin, masks); backward then recomputes one layer at a time, so one
general layer's full activations (``recompute``) join the peak.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .counts import ArchInfo

FP32 = 4


@dataclass
class ActivationPrediction:
    """Bytes per micro step by term; ``saved`` is what the census measures, ``peak`` adds the
    recompute of one layer under checkpointing."""

    terms: dict = field(default_factory=dict)
    recompute: int = 0
    family: str = ""

    @property
    def saved(self) -> int:
        return int(sum(self.terms.values()))

    @property
    def peak(self) -> int:
        return self.saved + self.recompute


@dataclass(frozen=True)
class Shape:
    """What the terms need: the architecture and the run's sizes."""

    arch: ArchInfo
    b: int
    s: int
    w: int
    mask: int  # bytes per element of a dropout mask
    rank: int
    targets: int  # adapted matrices per layer
    full: bool  # full fine-tuning (every weight trains)
    accelerator: str
    masked: bool  # batches carry a padding mask

    @property
    def tokens(self) -> int:
        return self.b * self.s

    @property
    def head_dim(self) -> int:
        return self.arch.hidden // max(self.arch.heads, 1)

    @property
    def stat(self) -> int:
        """Bytes of a LayerNorm mean / rstd: fp32 on CUDA, the input's dtype on the CPU."""
        return FP32 if self.accelerator == "cuda" else self.w

    def attention_kernel(self) -> str:
        """``eager``; ``math``: sdpa with dropout on the CPU, where the fused kernel takes no
        dropout and PyTorch's math kernel computes in fp32; else ``flash`` (fused: keeps the
        output and the log-sum-exp)."""
        if self.arch.attention == "eager":
            return "eager"
        return "math" if self.accelerator == "cpu" and self.arch.attention_dropout > 0 else "flash"


def _llama_layer(x: Shape, first: bool = False) -> int:
    a, h, w = x.arch, x.arch.hidden, x.w
    g = a.kv_heads * x.head_dim
    norm = FP32 * h + FP32 + w * h + (w * h if x.full else 0)
    first_norm = norm - (FP32 * h + FP32 if first and not x.full else 0)
    if a.attention == "eager":
        attn = 4 * w * h + a.heads * x.s * (FP32 + (w if w < FP32 else 0))
    elif x.masked:  # with a mask sdpa gets k, v repeated to a heads and its own copy of the mask
        attn = w * 4 * h + FP32 * a.heads + w * x.s
    else:
        attn = w * (2 * h + 2 * g) + FP32 * a.heads
    return first_norm + norm + attn + 4 * w * a.intermediate + w * x.rank * x.targets


def _attention_math_or_flash(x: Shape) -> int:
    """gpt2 / bert attention: q, k, v and the output; eager and math also the a s-sized
    softmax, dropout noise and dropped probabilities (math: q, k, v and those in fp32)."""
    a, h, w, kernel = x.arch, x.arch.hidden, x.w, x.attention_kernel()
    if kernel == "eager":
        return w * (4 * h + 3 * a.heads * x.s)
    if kernel == "math":
        return FP32 * (3 * h + 3 * a.heads * x.s) + w * h
    return w * 4 * h + FP32 * a.heads + (w * x.s if x.masked else 0)


def _gpt2_layer(x: Shape, first: bool = False) -> int:
    h, w = x.arch.hidden, x.w
    ln = w * h + 2 * x.stat + w * h
    first_ln = ln - (w * h + 2 * x.stat if first and not x.full else 0)
    return first_ln + ln + _attention_math_or_flash(x) + 2 * h * x.mask + 5 * w * x.arch.intermediate \
        + w * x.rank * x.targets


def _bert_layer(x: Shape, first: bool = False) -> int:
    h, w = x.arch.hidden, x.w
    return w * h + _attention_math_or_flash(x) + 2 * h * x.mask + 2 * (w * h + 2 * x.stat) + w * h \
        + 2 * w * x.arch.intermediate + w * x.rank * x.targets


LAYER = {"llama": _llama_layer, "gpt2": _gpt2_layer, "bert": _bert_layer}


def _edges(x: Shape) -> dict:
    """Bytes per token before the first layer and after the last (head and loss); per sequence
    (a classification head); and once per micro step (inputs shared by all layers)."""
    a, h, w, fam = x.arch, x.arch.hidden, x.w, x.arch.family
    before = 0
    if x.full:  # the embedding's backward keeps the ids; dropout/LayerNorm keep their inputs
        before = 8 + {"llama": 0, "gpt2": h * x.mask, "bert": w * h + 2 * x.stat + h * x.mask}[fam]
    per_sequence = 0
    if a.num_labels:  # classification: the last layer's output stays alive (the pooler's view)
        after, per_sequence = w * h, 3 * w * h + FP32 * a.num_labels + 8
    else:
        norm = FP32 * h + FP32 if fam == "llama" else w * h + 2 * x.stat
        head_input = (2 if fam == "llama" else 1) * w * h if x.full else 0
        after = norm + head_input + FP32 * a.vocab + 8
    shared = 2 * x.s * x.head_dim * w if fam == "llama" else (8 * x.s if x.full else 0)
    return {"before": before, "after": after, "per_sequence": per_sequence, "shared": shared}


def _checkpoint_shared(x: Shape) -> int:
    """Inputs every checkpointed layer holds besides the hidden states: the mask (eager: an
    additive b s s mask in w; sdpa with padding: a boolean one) and the position ids."""
    mask = 0
    if x.arch.attention == "eager" and x.arch.family != "bert":
        mask = x.b * x.s * x.s * x.w
    elif x.masked:
        mask = x.b * x.s * x.s
    return mask + (8 * x.s if x.arch.family == "llama" or (x.arch.family == "gpt2" and not x.full) else 0)


def predict_activations(arch: ArchInfo, micro_batch: int, seq_len: int, dtype_bytes: int, *, rank: int = 0,
                        targets: int = 0, full: bool = False, checkpointing: bool = False,
                        accelerator: str = "cuda", masked: bool = True) -> ActivationPrediction:
    """Activation bytes of one micro step (``micro_batch`` x ``seq_len`` tokens) by term.

    ``rank`` / ``targets``: R and adapted matrices per layer (0 for full fine-tuning);
    ``full``: every weight trains; ``masked``: batches carry a padding mask (as the trainer's
    padded batches do; packed or equal-length sequences do not). Unknown families get the
    generic estimate of Korthikanti et al. 2022 (eq. 2: per layer s b h (34 + 5 a s / h) bytes
    in 16 bit, 2x in fp32)."""
    x = Shape(arch, micro_batch, seq_len, dtype_bytes, 1 if accelerator == "cuda" else dtype_bytes, rank, targets,
              full, accelerator, masked)
    t = x.tokens
    if arch.family not in LAYER:
        s, b, h, a = seq_len, micro_batch, arch.hidden, max(arch.heads, 1)
        per_layer = 2 * s * b * h if checkpointing else s * b * h * (34 + 5 * a * s / h)
        return ActivationPrediction({"layers (generic estimate)": int(dtype_bytes / 2 * arch.layers * per_layer),
                                     "logits": b * s * arch.vocab * (dtype_bytes + 4)}, family="generic")
    layer, edges = LAYER[arch.family], _edges(x)
    general, first = t * layer(x), t * layer(x, first=True)
    out = ActivationPrediction(family=arch.family)
    out.terms["embeddings"] = t * edges["before"]
    if checkpointing:
        out.terms["layer inputs"] = arch.layers * t * dtype_bytes * arch.hidden + _checkpoint_shared(x)
        out.recompute = general
    else:
        out.terms["layers"] = first + (arch.layers - 1) * general
    out.terms["shared"] = edges["shared"]
    out.terms["head and loss"] = t * edges["after"] + micro_batch * edges["per_sequence"]
    return out
