"""The trainer's typed configuration and its command line.

Precedence: dataclass defaults < ``--config`` file (JSON or YAML) < flags actually given on the
command line. ``TrainConfig.explicit`` records which fields the user set (in the file or on the
command line): only those can contradict an explicit value of the DeepSpeed JSON
(see ``rosa_ds.dsconfig.build_ds_config``). ``save_resolved`` writes a JSON that round-trips
through ``--config``.

The default job (SmolLM2-135M on BBC headlines, ROSA r=8, ZeRO-2, 2 CPU ranks, fp32) is sized to
finish in about 5 minutes on 2 cores: 256 training samples / (4 per rank × 2 ranks) = 32
optimizer steps per epoch, 2 epochs (one resample in between) = 64 steps at ~3 s per step.
``--task classification`` alone is the packaged MiniLM-L6 encoder on BBC 5-way topics with the
same 64 steps (first 128 tokens of each article), a higher learning rate for the new head
(``CLASSIFICATION_LR``) and 200 held-out articles for evaluation (``TASK_DEFAULTS``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .config import INITS, QUANTIZE_BASE, SOLVERS, STRATEGIES, RosaConfig
from .dsconfig import OPTIMS, PRECISIONS, RunValues, resolve_template

TASKS = ("causal_lm", "classification")
METHODS = ("rosa", "lora", "full")
DEFAULT_DATASETS = {"causal_lm": "bbc-headlines", "classification": "bbc-topics"}
# Peak learning rates that suit short runs: adapters tolerate ~25x more than full fine-tuning.
DEFAULT_LR = {"rosa": 5e-4, "lora": 5e-4, "full": 2e-5}
# Classification trains a newly initialised head (and the pooler's inputs) from scratch in 64 steps,
# which needs ~4x the LM rates. Measured on MiniLM-L6 / bbc-topics, 64 steps of 8, 200 held-out
# articles, one process: ROSA r=8 reaches 66% accuracy at 5e-4 and 93% at 2e-3; full FT 91% by
# step 32 at 1e-4.
CLASSIFICATION_LR = {"rosa": 2e-3, "lora": 2e-3, "full": 1e-4}
# Per-task defaults that replace a field's dataclass default when the user did not set the field.
# 200 held-out articles (not 32): accuracy in 0.5% steps instead of 3%; eval is forward-only (~5 s).
TASK_DEFAULTS = {"classification": {"max_eval_samples": 200}}
NOT_SAVED = ("config", "local_rank", "explicit")  # launcher/bookkeeping fields, not run settings


def opt(default: Any, help: str, choices: tuple = (), minimum: Optional[float] = None, compare: bool = True,
        **argparse_kw) -> Any:
    """A dataclass field carrying its one-line help, allowed choices and lower bound."""
    meta = {"help": help, "choices": choices, "min": minimum, "argparse": argparse_kw}
    return field(default=default, compare=compare, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run; validated at construction (one-line errors with the fix)."""

    # -- model and data
    model: str = opt("default", "hub name, local directory, or .gguf file; 'default' = the embedded model of the task")
    task: str = opt("causal_lm", "causal_lm (generate the target) or classification (predict a label)", TASKS)
    dataset: Optional[str] = opt(None, "dataset name or path; none = built-in per task (bbc-headlines / bbc-topics)")
    prompt_field: Optional[str] = opt(None, "causal_lm: column with the prompt (loss is not taken on it)")
    target_field: Optional[str] = opt(None, "causal_lm: column with the text to learn to generate")
    text_field: Optional[str] = opt(None, "column with the input text (plain LM text, or classification input)")
    text_pair_field: Optional[str] = opt(None, "classification: column with the second text of a pair")
    label_field: Optional[str] = opt(None, "classification: column with the label")
    max_train_samples: Optional[int] = opt(256, "use at most N training samples (none = all)", minimum=1)
    max_eval_samples: Optional[int] = opt(
        32, "use at most N evaluation samples (none = all); classification default: 200", minimum=1)
    seq_len: int = opt(128, "tokens per sample (longer are truncated)", minimum=8)
    # -- method
    method: str = opt("rosa", "rosa (random subspace adaptation), lora (peft baseline) or full fine-tuning", METHODS)
    rank: int = opt(8, "ROSA/LoRA rank R: trainable singular triplets per adapted matrix", minimum=1)
    strategy: str = opt("random", "ROSA: which singular triplets are trainable", STRATEGIES)
    init: str = opt("svd", "ROSA: svd (factors from singular triplets) or lora (ablation: A random, B zero)", INITS)
    solver: str = opt("gram", "ROSA: singular directions from the Gram matrix's eigenvectors (fast) or torch's svd",
                      SOLVERS)
    quantize_base: Optional[str] = opt(
        None, "ROSA: store the frozen W_f quantized, nf4 or int8 (bitsandbytes), with an fp32 master in host RAM")
    target_modules: Optional[Union[list, str]] = opt(
        None, "leaf names of the layers to adapt, or one 're:<regex>' on full names; none = per-architecture defaults",
        nargs="+")
    modules_to_save: Optional[list] = opt(
        None, "modules kept fully trainable (e.g. classifier); none = the classification head for classification",
        nargs="+")
    resample_every: Union[str, int] = opt(
        "epoch", "ROSA: merge and redraw the subspace every 'epoch', 'never', or N optimizer steps")
    rewarmup_steps: int = opt(
        0, "ROSA: K optimizer steps of LR re-warmup after each resample (0 = continuous schedule)", minimum=0)
    # -- optimization
    epochs: int = opt(2, "passes over the training samples", minimum=1)
    max_steps: Optional[int] = opt(None, "stop after N optimizer steps (none = run all epochs)", minimum=1)
    lr: Optional[float] = opt(None, "peak learning rate; none = 5e-4 for rosa/lora, 2e-5 for full "
                                    "(classification: 2e-3 for rosa/lora, 1e-4 for full)", minimum=0)
    warmup: float = opt(0.1, "LR warmup: a fraction of all steps if < 1, else a number of optimizer steps", minimum=0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", minimum=0)
    micro_batch: int = opt(4, "samples per rank per forward/backward", minimum=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", minimum=1)
    precision: str = opt("auto", "auto (bf16 on CUDA with bf16 support, else fp32), fp32, bf16 or fp16", PRECISIONS)
    optim: str = opt("adamw", "adamw (from the DeepSpeed JSON) or adamw8bit (bitsandbytes)", OPTIMS)
    seed: int = opt(0, "seed of data order, initialisation and ROSA subspaces")
    # -- evaluation, checkpoints, logging
    eval_every: int = opt(0, "evaluate every N optimizer steps (0 = at the end of each epoch)", minimum=0)
    num_samples: int = opt(3, "causal_lm: generated samples printed at each evaluation", minimum=0)
    save_every: int = opt(0, "checkpoint every N optimizer steps (0 = only at the end)", minimum=0)
    output_dir: str = opt("runs/default", "where checkpoints, the resolved config, logs and the final model go")
    resume: Optional[str] = opt(None, "resume: bare flag = latest checkpoint in --output-dir, or a checkpoint path",
                                nargs="?", const="latest")
    tensorboard: bool = opt(False, "write TensorBoard logs to <output-dir>/tb")
    # -- DeepSpeed and the launcher
    deepspeed: str = opt("zero2", "DeepSpeed JSON template: a path, or zero1|zero2|zero3|zero2_offload|zero3_offload")
    config: Optional[str] = opt(None, "JSON or YAML file of settings (overridden by flags given on the command line)",
                                 compare=False)
    local_rank: int = opt(-1, "set by the DeepSpeed launcher; ignored (ranks come from the environment)", compare=False)
    explicit: set = field(default_factory=set, repr=False, compare=False,
                          metadata={"help": "fields the user set (file or command line)", "internal": True})

    def __post_init__(self) -> None:
        for f in _fields():
            setattr(self, f.name, _check_type(f.name, getattr(self, f.name), _hints()[f.name]))
            _check_bounds(f, getattr(self, f.name))
        self.resample_every = _parse_resample(self.resample_every)
        self._apply_task_defaults()
        if self.lr is None:
            self.lr = (CLASSIFICATION_LR if self.task == "classification" else DEFAULT_LR)[self.method]
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}; fix: e.g. --lr 5e-4")
        if self.dataset is None:
            self.dataset = DEFAULT_DATASETS[self.task]
        self.target_modules = _parse_targets(self.target_modules)
        self._check_cross_fields()
        self.explicit = set(self.explicit)

    def _apply_task_defaults(self) -> None:
        """The task's own defaults for fields the user left alone (not set, still the dataclass default)."""
        defaults = {f.name: f.default for f in _fields()}
        for name, value in TASK_DEFAULTS.get(self.task, {}).items():
            if name not in self.explicit and getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def _check_cross_fields(self) -> None:
        only = {"prompt_field": "causal_lm", "target_field": "causal_lm",
                "text_pair_field": "classification", "label_field": "classification"}
        for name, task in only.items():
            if getattr(self, name) is not None and self.task != task:
                raise ValueError(f"--{_flag(name)} applies to --task {task} only; fix: drop it or use --task {task}")
        if self.model.endswith(".gguf") and not Path(self.model).is_file():
            raise ValueError(f"--model {self.model} not found; fix: give an existing .gguf file")
        if self.quantize_base is not None and self.quantize_base not in QUANTIZE_BASE:
            raise ValueError(f"--quantize-base {self.quantize_base!r} does not exist; choose one of "
                             f"{', '.join(QUANTIZE_BASE)}")
        if self.quantize_base is not None and self.method != "rosa":
            raise ValueError(f"--quantize-base applies to --method rosa only (got --method {self.method}); "
                             "fix: drop --quantize-base or use --method rosa")
        if self.quantize_base == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--quantize-base nf4 needs bitsandbytes; fix: pip install bitsandbytes or use int8")
        if self.optim == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--optim adamw8bit needs bitsandbytes; fix: pip install bitsandbytes or use --optim adamw")
        resolve_template(self.deepspeed)

    # -- derived values the engine needs
    def warmup_steps(self, total_steps: int) -> int:
        """Warmup in optimizer steps: ``round(warmup * total)`` if warmup < 1, else ``int(warmup)``."""
        return round(self.warmup * total_steps) if self.warmup < 1 else int(self.warmup)

    def run_values(self, total_steps: int) -> RunValues:
        """What ``build_ds_config`` fills the DeepSpeed template with (explicitness included)."""
        explicit = {k for k in ("micro_batch", "grad_accum", "lr", "weight_decay", "precision", "optim")
                    if k in self.explicit}
        if "warmup" in self.explicit:
            explicit.add("warmup_steps")
        if "max_steps" in self.explicit and self.max_steps is not None:
            explicit.add("total_steps")
        return RunValues(micro_batch=self.micro_batch, grad_accum=self.grad_accum, lr=self.lr,
                         total_steps=total_steps, warmup_steps=min(self.warmup_steps(total_steps), total_steps),
                         weight_decay=self.weight_decay, precision=self.precision, optim=self.optim,
                         explicit=frozenset(explicit))

    def rosa_config(self) -> RosaConfig:
        """The method's own config (pure PyTorch side)."""
        return RosaConfig(rank=self.rank, target_modules=self.target_modules, strategy=self.strategy,
                          seed=self.seed, modules_to_save=tuple(self.modules_to_save or ()), init=self.init,
                          quantize_base=self.quantize_base, solver=self.solver)

    def to_dict(self) -> dict:
        """Run settings as plain JSON values (launcher/bookkeeping fields left out)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in _fields() if f.name not in NOT_SAVED}


# ---------------------------------------------------------------- reading and writing

def parse_args(argv: Optional[list] = None) -> TrainConfig:
    """defaults < --config file < flags given; ``explicit`` = fields set by the file or the flags."""
    given = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    alias = given.pop("deepspeed_config", None)
    if alias is not None:
        if "deepspeed" in given and given["deepspeed"] != alias:
            raise ValueError(f"--deepspeed {given['deepspeed']} and --deepspeed_config {alias} differ; fix: give one")
        given["deepspeed"] = alias
    from_file = load_config_file(given["config"]) if given.get("config") else {}
    values = {**from_file, **given}
    explicit = (set(from_file) | set(given)) - set(NOT_SAVED)
    return TrainConfig(**values, explicit=explicit)


def load_config_file(path: Union[str, Path]) -> dict:
    """Settings from a JSON or YAML file; unknown keys are an error that lists them all."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path} not found; fix: give an existing JSON or YAML file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; both mean a malformed file
        raise ValueError(f"--config {path} cannot be parsed ({type(exc).__name__}: {exc}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of setting names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in _fields()} - set(NOT_SAVED)
    unknown = sorted(set(data) - known)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise ValueError(f"--config {path} has unknown settings: {', '.join(hints)}; fix: remove or rename them")
    return data


def save_resolved(cfg: TrainConfig, path: Union[str, Path], ds_config: Optional[dict] = None) -> Path:
    """Write the resolved settings as JSON (loadable with ``--config``).

    With ``ds_config`` (the filled DeepSpeed dict), values that the DeepSpeed JSON decided
    (micro-batch, accumulation, lr, weight decay, precision) are written as actually used, so
    re-running with the saved file and the same template raises no contradiction.
    """
    if ds_config is not None:
        cfg = sync_from_ds(cfg, ds_config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path


def sync_from_ds(cfg: TrainConfig, ds_config: dict) -> TrainConfig:
    """A copy of ``cfg`` holding the values the filled DeepSpeed config really uses."""
    from .dsconfig import precision

    values = {"micro_batch": ds_config["train_micro_batch_size_per_gpu"],
              "grad_accum": ds_config["gradient_accumulation_steps"], "precision": precision(ds_config)}
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    for key in ("lr", "weight_decay"):
        if key in params:
            values[key] = float(params[key])
    return dataclasses.replace(cfg, **values, explicit=set(cfg.explicit))


# ---------------------------------------------------------------- argparse from the dataclass

def build_parser() -> argparse.ArgumentParser:
    """One flag per field (``--micro-batch``), with its help; defaults are suppressed so the
    namespace holds only the flags actually given (that is how ``explicit`` is known)."""
    parser = argparse.ArgumentParser(
        prog="train.py", description="Fine-tune an LLM with ROSA on DeepSpeed ZeRO.",
        argument_default=argparse.SUPPRESS)
    for f in _fields():
        kw = {"help": _help(f), **_argparse_type(f)}
        flags = [f"--{_flag(f.name)}"] + ([f"--{f.name}"] if f.name in ("local_rank",) else [])
        parser.add_argument(*flags, dest=f.name, **kw)
    parser.add_argument("--deepspeed_config", dest="deepspeed_config", metavar="PATH",
                        help="alias of --deepspeed (the name DeepSpeed's own argument parser uses)")
    return parser


def _argparse_type(f: dataclasses.Field) -> dict:
    hint = _hints()[f.name]
    base = _base_type(hint)
    kw = dict(f.metadata["argparse"])
    if base is bool:
        return {"action": argparse.BooleanOptionalAction, **kw}
    if f.metadata["choices"]:
        kw["choices"] = list(f.metadata["choices"])
    if base in (int, float) and _is_optional(hint):
        kw["type"] = _optional(base)
    elif base in (int, float):
        kw["type"] = base
    if not kw.get("choices"):
        kw.setdefault("metavar", {int: "N", float: "X"}.get(base, f.name.upper()))
    return {k: v for k, v in kw.items() if v is not None}


def _optional(base: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "all") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def _help(f: dataclasses.Field) -> str:
    return f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")


# ---------------------------------------------------------------- validation helpers

def _fields() -> list:
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


_HINTS: dict = {}


def _hints() -> dict:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    return _HINTS


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    return args[0] if len(args) == 1 else Union[tuple(args)]


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` coerced to the field's type (int -> float; tuple -> list), or a one-line error."""
    if value is None and _is_optional(hint):
        return None
    allowed = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    for kind in allowed:
        kind = typing.get_origin(kind) or kind
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        if kind in (str, bool) and type(value) is kind:
            return value
    want = " or ".join(getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in allowed)
    raise ValueError(f"TrainConfig.{name} must be {want}{' or none' if _is_optional(hint) else ''}, "
                     f"got {value!r} ({type(value).__name__}); fix: --{_flag(name)} with a valid value")


def _check_bounds(f: dataclasses.Field, value: Any) -> None:
    choices, minimum = f.metadata["choices"], f.metadata["min"]
    if choices and value not in choices:
        raise ValueError(f"--{_flag(f.name)} {value!r} does not exist; choose one of {', '.join(choices)}")
    if minimum is not None and value is not None and value < minimum:
        raise ValueError(f"--{_flag(f.name)} must be >= {minimum}, got {value}")


def _parse_resample(value: Union[str, int]) -> Union[str, int]:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value in ("epoch", "never") or (isinstance(value, int) and value >= 1):
        return value
    raise ValueError(f"--resample-every {value!r} is not valid; fix: use epoch, never, or a positive number of steps")


def _parse_targets(value: Union[list, str, None]) -> Union[list, str, None]:
    """A list of leaf names, or a regex string (given as one ``re:<regex>`` value or a plain string)."""
    if isinstance(value, list) and len(value) == 1 and value[0].startswith("re:"):
        value = value[0]
    if isinstance(value, str) and value.startswith("re:"):
        value = value[3:]
    if value == []:
        raise ValueError("--target-modules is empty; fix: give layer names, one re:<regex>, or leave it out")
    return value


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, set)) else value
