"""Apply ROSA to a model, resample it, report it, and merge it back into a plain model.

Single-process, pure PyTorch. The distributed versions (ZeRO) live in ``zero.py`` and reuse
``factorize.new_factors`` and ``RosaLinear.write`` so both paths draw identical subspaces.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import RosaConfig
from .errors import ConfigError
from .factorize import new_factors
from .layer import RosaLinear, is_adapter_param, is_supported, weight_shape
from .quant import QUANT_BUFFERS
from .utils.log import warn_rank0


def iter_rosa_layers(model: nn.Module) -> Iterator[tuple[str, RosaLinear]]:
    """(name, layer) of every ROSA layer, in ``layer_index`` order."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RosaLinear)]
    return iter(sorted(layers, key=lambda nm: nm[1].layer_index))


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_supported(m)]


def find_targets(model: nn.Module, config: RosaConfig) -> list[tuple[str, nn.Module]]:
    """Modules to adapt, validated. Raises (before anything is modified) when
    nothing matches, a match is of an unsupported type, or the rank is too large for a layer;
    warns (rank 0) about every listed target name that matched nothing."""
    matched = [(n, m) for n, m in model.named_modules()
               if n and config.matches_target(n) and not config.is_saved_module(n)
               and not isinstance(m, RosaLinear) and not any(isinstance(c, RosaLinear) for c in m.children())]
    if not matched:
        existing = _linear_names(model)
        shown = ", ".join(existing[:40]) + (" ..." if len(existing) > 40 else "")
        raise ConfigError(
            f"ROSA target_modules {config.target_modules!r} matched no module. "
            f"Linear/Conv1D modules in this model: {shown or '(none)'}"
        )
    _warn_unmatched(config, matched)
    bad = [f"{n} ({type(m).__name__})" for n, m in matched if not is_supported(m)]
    if bad:
        raise ConfigError(
            f"ROSA cannot adapt these matched modules: {', '.join(bad)}. Supported types: nn.Linear, "
            "transformers Conv1D; narrow target_modules to those"
        )
    for n, m in matched:
        rows, cols = weight_shape(m)
        if config.rank >= min(rows, cols):
            raise ConfigError(
                f"ROSA rank {config.rank} is too large for layer {n} ({rows}x{cols}): "
                f"the largest valid rank for it is {min(rows, cols) - 1}"
            )
    return matched


def _warn_unmatched(config: RosaConfig, matched: list[tuple[str, nn.Module]]) -> None:
    """A listed leaf name that matched nothing is usually a typo ("v_porj"), or a name of another
    architecture; the layers that did match are adapted, so say which names were ignored."""
    if not isinstance(config.target_modules, tuple):  # the defaults, or one regex (it matched)
        return
    unmatched = [t for t in config.target_modules if t not in {n.split(".")[-1] for n, _ in matched}]
    if unmatched:
        warn_rank0(f"ROSA target_modules {', '.join(unmatched)} matched no module (adapting only "
                   f"{', '.join(sorted({n.split('.')[-1] for n, _ in matched}))}); check the names")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


@torch.no_grad()
def apply_rosa(model: nn.Module, config: RosaConfig, factorize: bool = True,
               gather: Callable[[nn.Module], ContextManager] = lambda module: contextlib.nullcontext()) -> nn.Module:
    """Replace target modules with ``RosaLinear`` (factorized at resample index 0) in place.

    Afterwards only ``rosa_A``/``rosa_B`` and the ``modules_to_save`` are trainable.
    The function output is unchanged up to fp32 rounding (W_f + A B = W).
    With ``factorize=False`` the layers start as W_f = W, A = B = 0 (same function) and the
    caller factorizes; the distributed engine does so with one SVD per layer in the world.
    ``gather(module)``: a context in which the module's full weight is readable (the DeepSpeed
    seam passes a ZeRO-3 gather for a quantized base, which quantizes the whole weight).
    """
    targets = find_targets(model, config)
    for index, (name, module) in enumerate(targets):
        with gather(module):
            layer = RosaLinear(module, config.rank, index, quantize=config.quantize_base)
        if factorize:
            factors = new_factors(layer.frozen_weight(), config, resample_index=0, layer_index=index)
            layer.write(factors)
            if not layer.quantized and config.wants_master(module.weight.dtype):
                layer.set_master(factors.w_frozen)  # exact fp32 W_f; the module holds it rounded once
        _set_submodule(model, name, layer)
    mark_trainable(model, config)
    model.rosa_config = config  # kept for resample / reports; not part of the state dict
    model.rosa_resamples = 0
    return model


def mark_trainable(model: nn.Module, config: RosaConfig) -> None:
    """Freeze everything except factors and the modules kept fully trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_param(name) or config.is_saved_module(name.rpartition(".")[0]))


def _config_of(model: nn.Module) -> RosaConfig:
    config = getattr(model, "rosa_config", None)
    if config is None:
        raise ConfigError("this model has no ROSA layers; call rosa_ds.apply_rosa(model, config) first")
    return config


@torch.no_grad()
def resample(model: nn.Module, seed: int | None = None, resample_index: int | None = None) -> int:
    """Merge A B into W and draw a new subspace for every ROSA layer (single process).

    ``resample_index`` (default: one more than the last, 1 for the first resample after apply)
    and the config seed (or ``seed``) select the draw; the distributed engine uses the same
    derivation. Returns the resample index used. The optimizer state of the factors must be
    reset by the caller (the engine does it).
    """
    config = _config_of(model)
    if seed is not None and seed != config.seed:
        config = RosaConfig(**{**config.to_dict(), "seed": seed})
    layers = list(iter_rosa_layers(model))
    for name, layer in layers:  # check all first: nothing is modified if any layer is bad
        layer.check_finite(name)
    index = getattr(model, "rosa_resamples", 0) + 1 if resample_index is None else resample_index
    for _, layer in layers:
        layer.write(new_factors(layer.merged_weight(), config, index, layer.layer_index))
    model.rosa_resamples = index
    return index


def unwrap_name(name: str) -> str | None:
    """Map a ROSA state-dict key to the plain model's key (None for factor keys and the packed
    buffers of a quantized base, which the export replaces by the merged weight)."""
    if is_adapter_param(name) or (name.rsplit(".", 1)[-1] in QUANT_BUFFERS and ".base_layer." in name):
        return None
    return name.replace(".base_layer.", ".")


def merged_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module,
                      masters: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain-model state dict from a (full, gathered) ROSA state dict: W = W_f + A B per layer,
    merged in fp32 and cast once to W_f's storage dtype; keys as in the original model.

    Where an fp32 master of W_f exists (a quantized base, or a bf16 / fp16 W_f with
    ``frozen_master``: ``model``'s own on this process, or given in ``masters`` by layer name, (m, n)),
    W = master + A B: no quantization or rounding error of W_f enters the export."""
    out = {f"{name}.weight": merged_layer_weight(name, layer, state_dict, (masters or {}).get(name, layer.base_master))
           for name, layer in iter_rosa_layers(model)}
    for key, value in state_dict.items():
        plain = unwrap_name(key)
        if plain is not None and plain not in out:
            out[plain] = value
    return out


def merged_layer_weight(name: str, layer: RosaLinear, state_dict: dict[str, torch.Tensor],
                        master: torch.Tensor | None = None) -> torch.Tensor:
    """The plain weight of ROSA layer ``name``: W = W_f + A B from ``state_dict`` (full tensors of
    ``{name}.rosa_A``, ``{name}.rosa_B`` and, without a ``master`` (m, n), ``{name}.base_layer.weight``),
    merged in fp32, oriented as the original module stores W and rounded once to its dtype."""
    a, b = state_dict[f"{name}.rosa_A"], state_dict[f"{name}.rosa_B"]
    dtype = layer.base_layer.weight_dtype if layer.quantized else state_dict[f"{name}.base_layer.weight"].dtype
    if master is not None:
        wf = master.t() if layer.transposed else master
    else:
        wf = state_dict[f"{name}.base_layer.weight"]
    for label, t in (("W_f", wf), ("rosa_A", a), ("rosa_B", b)):
        if t.device.type != "meta" and not torch.isfinite(t).all():  # meta: the export's shape-only plan
            raise FloatingPointError(f"ROSA layer {name}: {label} has non-finite values; refusing to merge")
    delta = a.float() @ b.float()
    return (wf.float() + (delta.t() if layer.transposed else delta)).to(dtype)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every ROSA layer into its base module and put the base module back.

    Returns the same model object, now plain: its state-dict keys equal the original's, all
    parameters are trainable again, and inference costs exactly what the original did.
    """
    layers = list(iter_rosa_layers(model))
    for name, layer in layers:
        layer.check_finite(name)
    for name, layer in layers:
        merged = layer.merged_weight()
        if layer.quantized:  # rebuild the original module type from master + A B (no quantization error)
            _set_submodule(model, name, layer.base_layer.to_plain(merged))
            continue
        layer.base_layer.weight.copy_(merged.t() if layer.transposed else merged)
        _set_submodule(model, name, layer.base_layer)
    for param in model.parameters():
        param.requires_grad_(True)
    for attr in ("rosa_config", "rosa_resamples"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@dataclass
class LayerReport:
    name: str
    m: int
    n: int
    rank: int

    @property
    def trainable(self) -> int:
        return self.rank * (self.m + self.n)

    @property
    def rho(self) -> float:
        """rho = m n / (R (m + n)): adapted weight parameters per trainable factor parameter."""
        return self.m * self.n / self.trainable


@dataclass
class TrainableReport:
    layers: list[LayerReport] = field(default_factory=list)
    trainable: int = 0
    frozen: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def rho(self) -> float:
        """Model-wide rho: total adapted weight parameters / total factor parameters."""
        factor = sum(l.trainable for l in self.layers)
        return sum(l.m * l.n for l in self.layers) / factor if factor else float("nan")

    def __str__(self) -> str:
        rows = [f"{'layer':<48} {'m':>6} {'n':>6} {'R':>4} {'trainable':>10} {'rho':>8}"]
        rows += [f"{l.name:<48} {l.m:>6} {l.n:>6} {l.rank:>4} {l.trainable:>10} {l.rho:>8.2f}" for l in self.layers]
        rows.append(f"trainable {self.trainable:,} / total {self.total:,} "
                    f"({100 * self.trainable / max(self.total, 1):.3f}%), frozen {self.frozen:,}, rho {self.rho:.2f}")
        return "\n".join(rows)


def trainable_report(model: nn.Module) -> TrainableReport:
    """Per-layer and total trainable / frozen parameter counts and rho (deduplicated by storage,
    so tied embeddings count once)."""
    report = TrainableReport()
    report.layers = [LayerReport(n, l.out_features, l.in_features, l.rank) for n, l in iter_rosa_layers(model)]
    seen: set[int] = set()
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions leave p.numel() == 0
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            report.trainable += numel
        else:
            report.frozen += numel
    # a quantized W_f is a buffer, not a parameter: still a frozen weight of the model
    report.frozen += sum(l.out_features * l.in_features for _, l in iter_rosa_layers(model) if l.quantized)
    return report
