"""DeepSpeed JSON templates with ``"auto"`` values, filled from the run's own settings.

A template (``ds_configs/zero2.json`` ...) says *how* to shard (ZeRO stage, offload, buckets);
the run says *how much* (micro-batch, accumulation, learning rate, schedule length, precision).
``build_ds_config`` fills every ``"auto"`` from a ``RunValues`` and keeps explicit JSON values,
except where they contradict a setting the user made explicitly: all such contradictions are
collected and raised as ONE ``DSConfigError``, each naming the JSON key, its value, the setting
(as its field, ``rosa_ds.errors.config_field``: the recipe says a flag), its value and the fix (the
pattern of accelerate's ``HfDeepSpeedConfig.fill_match``).

Batch sizes obey DeepSpeed's identity  train_batch_size = micro × accum × world_size.

``problems_of`` is the one validator of a filled config: every reason rosa_ds cannot run it, in
one error (``build_ds_config`` and ``rosa_ds.initialize`` both report through it).

Pure dict logic: no DeepSpeed import here; torch is read only to detect bf16 and fp16 support.
The templates ship inside the package (``rosa_ds/ds/templates``, linked as ``ds_configs/`` at the
top of the repository), so an installed rosa_ds finds them too.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import ConfigError, config_field
from ..memory.ds_json import AUTO, batch_sizes, offload_device, offload_optimizer, offload_param, precision, zero_stage  # noqa: F401
from ..memory.plan import ZERO3_AUTO

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMS = ("adamw", "adamw8bit", "sgd")
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE_NAMES = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")

# The run values a user sets explicitly (``RunValues.explicit``): only these contradict the JSON.
EXPLICIT_FIELDS = ("micro_batch", "grad_accum", "lr", "weight_decay", "warmup_steps", "total_steps", "precision")
# JSON locations of each run value; all listed locations of one value must agree.
KNOB_PATHS = {
    "micro_batch": (("train_micro_batch_size_per_gpu",),),
    "grad_accum": (("gradient_accumulation_steps",),),
    "lr": (("optimizer", "params", "lr"), ("scheduler", "params", "warmup_max_lr")),
    "weight_decay": (("optimizer", "params", "weight_decay"),),
    "warmup_steps": (("scheduler", "params", "warmup_num_steps"),),
    "total_steps": (("scheduler", "params", "total_num_steps"),),
}
INT_KNOBS = ("micro_batch", "grad_accum", "warmup_steps", "total_steps")
_MISSING = object()


class DSConfigError(ConfigError):
    """Every problem found in one DeepSpeed template, reported together (``.problems``)."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n > 1 else ''} in DeepSpeed config {source}:"
        super().__init__("\n  - ".join([head, *self.problems]))


@dataclass
class RunValues:
    """The values a run decides, used to fill ``"auto"`` in a DeepSpeed template.

    Attributes:
        micro_batch: samples per rank per forward/backward (train_micro_batch_size_per_gpu).
        grad_accum: micro-batches accumulated per optimizer step.
        lr: peak learning rate (optimizer lr and the scheduler's warmup_max_lr).
        total_steps: optimizer steps of the whole run (the scheduler's total_num_steps).
        warmup_steps: optimizer steps of linear warmup from 0 to ``lr``.
        weight_decay: decoupled (AdamW) weight decay.
        precision: ``auto`` (bf16 on CUDA with bf16 support, else fp32), ``fp32``, ``bf16``, ``fp16``.
        optim: ``adamw`` (from the JSON), ``adamw8bit`` (bitsandbytes client optimizer) or ``sgd``
            (plain SGD without momentum, as the ROSA paper's code trains: ``plain_sgd``).
        explicit: names of the fields above that the user set explicitly; only these can
            contradict an explicit JSON value (otherwise the JSON value wins).
    """

    micro_batch: int
    grad_accum: int
    lr: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    precision: str = "auto"
    optim: str = "adamw"
    explicit: frozenset = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in ("micro_batch", "grad_accum", "total_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"RunValues.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError(f"RunValues.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not _is_num(self.lr) or self.lr <= 0:
            raise ConfigError(f"RunValues.lr must be a positive number, got {self.lr!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"RunValues.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"RunValues.precision {self.precision!r} does not exist; "
                              f"choose one of {', '.join(PRECISIONS)}")
        if self.optim not in OPTIMS:
            raise ConfigError(f"RunValues.optim {self.optim!r} does not exist; choose one of {', '.join(OPTIMS)}")
        self.explicit = frozenset(self.explicit)
        unknown = self.explicit - set(EXPLICIT_FIELDS) - {"optim"}
        if unknown:
            raise ConfigError(f"RunValues.explicit names unknown fields {sorted(unknown)}; "
                              f"use names from {sorted(EXPLICIT_FIELDS)}")


# ---------------------------------------------------------------- public helpers

def detect_precision() -> str:
    """``bf16`` where CUDA supports it, else ``fp32`` (bf16 is slower than fp32 on our CPUs)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_template(template: Union[str, Path]) -> Path:
    """A template path, or a short name from ``ds_configs/`` (``zero2`` -> ds_configs/zero2.json)."""
    path = Path(template)
    if path.is_file():
        return path
    named = TEMPLATES_DIR / f"{template}.json"
    if str(template) in TEMPLATE_NAMES and named.is_file():
        return named
    raise ConfigError(f"DeepSpeed config {str(template)!r} not found; "
                      f"give a JSON path or one of {', '.join(TEMPLATE_NAMES)}")


def load_template(template: Union[str, Path, dict]) -> tuple[dict, str]:
    """(a deep copy of the template dict, a label for messages)."""
    if isinstance(template, dict):
        return copy.deepcopy(template), "<dict>"
    path = resolve_template(template)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON ({exc}); fix the file") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object at top level")
    return cfg, str(path)


def client_optimizer_config(cfg: dict) -> tuple[dict, dict]:
    """Split a filled config for a client optimizer (``optim="adamw8bit"``).

    Returns (config without its ``optimizer`` block and with ``zero_allow_untested_optimizer``
    set, the optimizer's params: lr, betas, eps, weight_decay) so the engine can build
    ``bnb.optim.AdamW8bit(params, **kwargs)`` and pass it to ``deepspeed.initialize``.
    """
    out = copy.deepcopy(cfg)
    params = dict((out.pop("optimizer", None) or {}).get("params", {}))
    params.pop("torch_adam", None)
    params.pop("adam_w_mode", None)
    out["zero_allow_untested_optimizer"] = True
    return out, params


def plain_sgd(cfg: dict) -> None:
    """Replace a filled config's optimizer by ``torch.optim.SGD`` without momentum (in place):
    θ ← θ − η·(g + λθ), no state at all, so a resample has nothing to reset. The learning rate and
    weight decay stay those the run filled; the scheduler is kept. DeepSpeed builds any
    ``torch.optim`` class named in ``optimizer.type`` but asks for ``zero_allow_untested_optimizer``
    before ZeRO wraps one it has not tested."""
    params = (cfg.get("optimizer") or {}).get("params") or {}
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": params.get("lr"), "momentum": 0.0,
                                                  "weight_decay": params.get("weight_decay", 0.0)}}
    cfg["zero_allow_untested_optimizer"] = True


# ---------------------------------------------------------------- the builder

def build_ds_config(template: Union[str, Path, dict], run: RunValues, world_size: int) -> dict:
    """Fill every ``"auto"`` of ``template`` from ``run``; raise one error listing every problem.

    Explicit JSON values are kept unless they contradict an explicitly set run value. Checks: batch
    identity (train_batch_size = micro × accum × world), then everything ``problems_of`` checks
    (ZeRO stage 1..3, offload, precision, no ``"auto"`` left behind).
    """
    if not _is_int(world_size) or world_size < 1:
        raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
    cfg, source = load_template(template)
    problems: list[str] = []
    accum_pinned = "grad_accum" in run.explicit or cfg.get("gradient_accumulation_steps", AUTO) != AUTO
    values = {k: _resolve_knob(cfg, k, getattr(run, k), k in run.explicit, problems, source)
              for k in KNOB_PATHS}
    _resolve_batch(cfg, values, accum_pinned, world_size, problems, source)
    _resolve_precision(cfg, run, problems, source)
    _fill_derived(cfg)
    if run.optim == "sgd":
        plain_sgd(cfg)
    problems += problems_of(cfg, source, client_optimizer=run.optim == "adamw8bit")
    if problems:
        raise DSConfigError(source, problems)
    return cfg


def _resolve_knob(cfg: dict, knob: str, run_value: Any, explicit: bool, problems: list, source: str) -> Any:
    """Effective value of one run value; fills its ``"auto"`` locations; records contradictions."""
    found = []
    for path in KNOB_PATHS[knob]:
        v = _get(cfg, path)
        if v is _MISSING or v == AUTO:
            continue
        if not _valid_knob_value(knob, v):
            kind = "a positive integer" if knob in INT_KNOBS else "a number"
            problems.append(f'{".".join(path)}={v!r} in {source} is not valid; fix: use {kind} or "auto"')
            continue
        found.append((path, v))
    if len({float(v) for _, v in found}) > 1:
        listed = " and ".join(f"{'.'.join(p)}={v!r}" for p, v in found)
        problems.append(f'{listed} disagree in {source}; fix: make them equal or set them to "auto"')
    value = run_value
    if found and explicit:
        for path, v in found:
            if not _same(v, run_value):
                problems.append(_contradiction(".".join(path), v, source, knob, run_value))
    elif found:
        value = found[0][1]
    for path in KNOB_PATHS[knob]:
        if _get(cfg, path) == AUTO:
            _set(cfg, path, value)
    return value


def _resolve_batch(cfg: dict, values: dict, accum_pinned: bool, world: int, problems: list, source: str) -> None:
    """train_batch_size = micro × accum × world: fill it, or derive accum from an explicit one."""
    micro, accum = values["micro_batch"], values["grad_accum"]
    total = cfg.get("train_batch_size", AUTO)
    if total != AUTO:
        if not _valid_knob_value("micro_batch", total):
            problems.append(f"train_batch_size={total!r} in {source} is not valid; "
                            'fix: use a positive integer or "auto"')
            total = AUTO
        elif total % (micro * world):
            problems.append(
                f"train_batch_size={total} in {source} is not divisible by micro-batch {micro} × world size "
                f"{world} = {micro * world}; fix: set train_batch_size to \"auto\" or to a multiple of {micro * world}")
            total = AUTO
        else:
            if accum_pinned and total != micro * accum * world:
                problems.append(
                    f"train_batch_size={total} in {source} contradicts {config_field('micro_batch')} {micro} × "
                    f"{config_field('grad_accum')} {accum} × world size {world} = {micro * accum * world}; fix: set "
                    f"train_batch_size to \"auto\" (or {micro * accum * world}) or change those settings")
            accum = total // (micro * world)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = micro * accum * world


def _resolve_precision(cfg: dict, run: RunValues, problems: list, source: str) -> None:
    """bf16.enabled / fp16.enabled from the run's precision; an explicit ``true`` in the JSON wins."""
    wanted = detect_precision() if run.precision == AUTO else run.precision
    explicit = "precision" in run.explicit and run.precision != AUTO
    flags = {k: (cfg.get(k) or {}).get("enabled", AUTO) for k in ("bf16", "fp16")}
    on = [k for k, v in flags.items() if v is True]
    if len(on) == 2:  # reported by problems_of
        return
    chosen = on[0] if on else wanted
    if not on and flags.get(wanted) is False:
        chosen = "fp32"  # the JSON forbids the detected/requested low precision
    if explicit and chosen != wanted:
        key = f"{on[0]}.enabled" if on else f"{wanted}.enabled"
        problems.append(_contradiction(key, bool(on), source, "precision", wanted, not on))
    for k, v in flags.items():
        if v == AUTO:
            section = cfg.setdefault(k, {})
            if isinstance(section, dict):
                section["enabled"] = chosen == k


def accelerator_name() -> str:
    """``cuda`` or ``cpu``: the accelerator DeepSpeed will pick, without importing DeepSpeed here
    (the recipe's config imports this module; DS_ACCELERATOR=cpu forces DeepSpeed's CPU one)."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" else "cpu"


def _fill_derived(cfg: dict) -> None:
    """``"auto"`` values that follow from the machine rather than from the run."""
    sched = (cfg.get("scheduler") or {}).get("params") or {}
    if sched.get("warmup_min_lr") == AUTO:
        sched["warmup_min_lr"] = 0.0
    if sched.get("warmup_num_steps") == 0 and (cfg.get("scheduler") or {}).get("type", "").startswith("Warmup"):
        # DeepSpeed's WarmupLR family rejects 0 (and treats anything below 2 as 2).
        sched["warmup_num_steps"] = 1
    fill_machine_autos(cfg)


def fill_machine_autos(cfg: dict) -> dict:
    """Fill (in place) the ZeRO ``"auto"`` values chosen by accelerator rather than by the run
    (ZeRO-3 buffers and overlap, ``ZERO3_AUTO``; offload ``pin_memory``). Also for a config a
    Trainer fills itself: transformers and accelerate know none of these keys and refuse "auto"."""
    zero = cfg.get("zero_optimization") or {}
    tuned = ZERO3_AUTO["cpu" if accelerator_name() == "cpu" else "cuda"]
    for key, value in tuned.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    for key in ("offload_optimizer", "offload_param"):
        off = zero.get(key)
        if isinstance(off, dict) and off.get("pin_memory") == AUTO:
            # Page-locked host memory speeds CUDA copies; the cpu accelerator ignores it anyway.
            off["pin_memory"] = torch.cuda.is_available()
    return cfg


def problems_of(cfg: dict, source: str = "<dict>", client_optimizer: bool = False) -> list[str]:
    """Every reason ``cfg`` (a filled DeepSpeed config) cannot run under rosa_ds, one line each
    with its fix. ``build_ds_config`` and ``rosa_ds.initialize`` both report through this."""
    problems: list[str] = []
    stage = zero_stage(cfg)
    if not _is_int(stage) or not 0 <= stage <= 3:
        problems.append(f"zero_optimization.stage={stage!r} in {source} does not exist; fix: use 1, 2 or 3")
    elif stage == 0:
        problems.append(f"ZeRO stage 0 (in {source}) is not supported by rosa_ds: ROSA needs DeepSpeed's flat fp32 "
                        "partitions to write new factors into; fix: use stage 1 (ds_configs/zero1.json), which on "
                        "one GPU costs the same memory as stage 0")
    problems += _offload_problems(cfg, stage, source, client_optimizer)
    problems += _precision_problems(cfg, source)
    autos = [".".join(p) for p in _find_auto(cfg)]
    if autos:
        problems.append(f'{", ".join(autos)} still "auto" in {source}; fix: fill them with rosa_ds.build_ds_config('
                        "template, RunValues(...), world_size) or set explicit values")
    return problems


def check_ds_config(cfg: dict, source: str = "<dict>", client_optimizer: bool = False) -> None:
    """Raise one ``DSConfigError`` listing every problem of a filled config (none: returns)."""
    problems = problems_of(cfg, source, client_optimizer)
    if problems:
        raise DSConfigError(source, problems)


def _offload_problems(cfg: dict, stage: Any, source: str, client_optimizer: bool) -> list[str]:
    out = []
    opt_dev = offload_device(cfg, "offload_optimizer")
    if opt_dev not in ("none", "cpu", "nvme"):
        out.append(f"zero_optimization.offload_optimizer.device={opt_dev!r} in {source}; fix: use cpu or none")
    if opt_dev == "nvme":
        out.append(f"zero_optimization.offload_optimizer.device=nvme in {source} is not supported by rosa_ds "
                   "(resampling clears optimizer state in memory); fix: use cpu")
    if offload_optimizer(cfg) and _is_int(stage) and stage < 1:
        out.append(f"zero_optimization.offload_optimizer needs ZeRO stage >= 1 but stage is {stage} in {source}; "
                   "fix: set stage 1, 2 or 3, or remove offload_optimizer")
    if offload_device(cfg, "offload_param") == "nvme":
        out.append(f"zero_optimization.offload_param.device=nvme in {source} is not supported by rosa_ds (its "
                   "checkpoints and resamples read the partitions in memory); fix: use cpu")
    if offload_param(cfg) and stage != 3:
        out.append(f"zero_optimization.offload_param needs ZeRO stage 3 but stage is {stage} in {source}; "
                   "fix: set stage 3 or remove offload_param")
    if client_optimizer and offload_optimizer(cfg) and cfg.get("zero_force_ds_cpu_optimizer") is not False:
        out.append(f"zero_optimization.offload_optimizer in {source} runs DeepSpeed's CPU Adam, so a client "
                   f"optimizer (e.g. {config_field('optim')} adamw8bit) cannot be offloaded; fix: use "
                   f"{config_field('optim')} adamw or a config without offload_optimizer")
    return out


def _precision_problems(cfg: dict, source: str) -> list[str]:
    out = []
    flags = {k: (cfg.get(k) or {}).get("enabled", AUTO) for k in ("bf16", "fp16")}
    for k, v in flags.items():
        if v not in (True, False, AUTO):
            out.append(f'{k}.enabled={v!r} in {source} is not valid; fix: use true, false or "auto"')
    if flags["bf16"] is True and flags["fp16"] is True:
        out.append(f"bf16.enabled and fp16.enabled are both true in {source}; fix: enable at most one")
    elif flags["fp16"] is True and not torch.cuda.is_available():
        out.append(f"fp16.enabled=true in {source}, but DeepSpeed's CPU accelerator does not support fp16; fix: "
                   "use fp32 (the CPU default) or bf16, or run on a GPU")
    return out


# ---------------------------------------------------------------- small utilities

def _contradiction(key: str, json_value: Any, source: str, name: str, run_value: Any,
                   agreeing: Any = _MISSING) -> str:
    """``key``'s JSON value contradicts the run value of the field ``name``; the fix offers
    ``agreeing`` as the JSON value that would agree (default: the run value itself)."""
    shown, setting = json.dumps(json_value), config_field(name)
    agreeing = run_value if agreeing is _MISSING else agreeing
    return (f"{key}={shown} in {source} contradicts {setting} {run_value}; fix: drop {setting}, or set "
            f'{key} to "auto" (or to {json.dumps(agreeing)}) in the JSON')


def _get(cfg: dict, path: tuple) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _set(cfg: dict, path: tuple, value: Any) -> None:
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _find_auto(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, prefix + (str(k),))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, prefix + (str(i),))]
    return [prefix] if node == AUTO else []


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_knob_value(knob: str, v: Any) -> bool:
    if knob in INT_KNOBS:
        return _is_int(v) and (v >= 1 or (knob == "warmup_steps" and v == 0))
    return _is_num(v) and v >= 0


def _same(a: Any, b: Any) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
