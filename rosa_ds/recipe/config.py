"""The trainer's typed configuration and its command line.

``TrainConfig`` composes the component configs (``RosaConfig``, ``ScheduleConfig``,
``DataConfig``): every option is declared once, with its help, in the component that uses it,
and validated there once; the recipe adds only its own settings (model, method, optimization,
checkpoints, DeepSpeed). The command line and config files stay flat (``--rank``, ``--seq-len``,
``--resample-every`` ...): each flag is a field name of exactly one of them.

Precedence: defaults (the component's, then the default job's ``JOB_DEFAULTS`` and the task's
``Task.defaults``, ``rosa_ds.recipe.tasks``) < ``--config`` file (JSON or YAML) < flags actually
given on the command line.
``TrainConfig.explicit`` records which options the user set (in the file or on the command line):
only those can contradict an explicit value of the DeepSpeed JSON (see
``rosa_ds.ds.config.build_ds_config``). ``save_resolved`` writes a flat JSON that round-trips
through ``--config``.

The default job (SmolLM2-135M on BBC headlines, ROSA r=8, ZeRO-2, 2 CPU ranks, fp32) is sized to
finish in about 5 minutes on 2 cores: 256 training samples / (4 per rank × 2 ranks) = 32
optimizer steps per epoch, 2 epochs (one resample in between) = 64 steps at ~3 s per step.
``--task classification`` alone is the packaged MiniLM-L6 encoder on BBC 5-way topics with the
same 64 steps (first 128 tokens of each article), a higher learning rate for the new head
(``Method.lrs``, ``rosa_ds.recipe.methods``) and 200 held-out articles for evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..config import RosaConfig
from ..ds.config import OPTIMS, PRECISIONS, RunValues, precision, resolve_template
from ..errors import ConfigError
from ..schedule import ScheduleConfig
from ..utils.options import (
    OptionError,
    allowed_types,
    check_options,
    flag_fields,
    flag_name,
    help_text,
    hints,
    is_optional,
    opt,
)
from ..utils.packages import is_installed
from ..utils.sizes import parse_size
from .baselines import LORA_INITS
from .data.config import DataConfig
from .methods import METHODS, method_of
from .tasks import task_of

# The components a run is made of: (attribute of TrainConfig, config class).
COMPONENTS = (("rosa", RosaConfig), ("schedule", ScheduleConfig), ("data", DataConfig))
# Options of the recipe that also set a component field of the same name.
SHARED = {"seed": ("rosa", "data")}
# Sizes of the default job where they differ from the components' library defaults.
JOB_DEFAULTS = {"seq_len": 128, "max_train_samples": 256, "max_eval_samples": 32}
NOT_SAVED = ("config", "local_rank", "overwrite_output_dir")  # launcher/bookkeeping options, not run settings


@dataclass
class TrainConfig:
    """Every setting of a training run: the recipe's own options plus the component configs."""

    # -- model and method
    model: str = opt("default", "hub name, local directory, or .gguf file; 'default' = the embedded model of the task")
    method: str = opt("rosa", " or ".join(m.help for m in METHODS.values()), tuple(METHODS))
    lora_init: str = opt("peft", "--method lora only: peft (PEFT's default init, scale 2) or paper (the ROSA paper "
                                 "code's LoRA: A = 0, B ~ N(0, 1), scale 1; for reproducing its protocol)", LORA_INITS)
    # -- optimization
    epochs: int = opt(2, "passes over the training samples", minimum=1)
    max_steps: Optional[int] = opt(None, "stop after N optimizer steps (none = run all epochs)", minimum=1)
    lr: Optional[float] = opt(None, "peak learning rate; none = 5e-4 for rosa/lora, 2e-5 for full "
                                    "(classification: 2e-3 for rosa/lora, 1e-4 for full)", minimum=0)
    warmup: float = opt(0.1, "LR warmup: a fraction of all steps if < 1, else a number of optimizer steps", minimum=0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", minimum=0)
    micro_batch: int = opt(4, "samples per rank per forward/backward", minimum=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", minimum=1)
    gradient_checkpointing: bool = opt(False, "recompute each transformer layer in backward (non-reentrant): "
                                              "a layer keeps only its input, at about one extra forward of cost")
    max_memory: Optional[str] = opt(None, "per-rank memory the run must fit (e.g. 40GiB): device memory on a GPU, "
                                          "host RAM on the CPU; a run predicted not to fit stops before loading "
                                          "weights and names a configuration that fits")
    precision: str = opt("auto", "auto (bf16 on CUDA with bf16 support, else fp32), fp32, bf16 or fp16", PRECISIONS)
    optim: str = opt("adamw", "adamw (from the DeepSpeed JSON), adamw8bit (bitsandbytes) or sgd (plain SGD, no "
                             "momentum, as the ROSA paper's code)", OPTIMS)
    seed: int = opt(0, "seed of data order and split, initialisation and ROSA subspaces")
    # -- evaluation, checkpoints, logging
    eval_every: int = opt(0, "evaluate every N optimizer steps (0 = at the end of each epoch)", minimum=0)
    save_every: int = opt(0, "checkpoint every N optimizer steps (0 = only at the end)", minimum=0)
    output_dir: str = opt("runs/default", "where checkpoints, the resolved config, logs and the final model go "
                                          "(classification: runs/default-cls)")
    overwrite_output_dir: bool = opt(False, "start over in an --output-dir that holds another run: its checkpoints, "
                                            "metrics and final model are deleted first (without it, or --resume, "
                                            "such a directory is refused)")
    resume: Optional[str] = opt(None, "resume: bare flag = the newest intact checkpoint in --output-dir (damaged ones "
                                "are skipped with a warning); or a checkpoints dir (likewise); or one checkpoint, "
                                "which must be intact", nargs="?", const="latest")
    tensorboard: bool = opt(False, "write TensorBoard logs to <output-dir>/tb")
    nan_policy: str = opt("stop", "a non-finite loss or gradient: stop (exit 3; nothing saved after it, the last "
                                  "good checkpoint kept) or skip (drop the step on every rank, stop after "
                                  "--nan-skip-limit in a row)", ("stop", "skip"))
    nan_skip_limit: int = opt(10, "--nan-policy skip: consecutive non-finite steps after which the run stops",
                              minimum=1)
    max_shard_size: str = opt("50GB", "largest safetensors shard of the exported model (e.g. 5GB, 500MB)")
    # -- DeepSpeed and the launcher
    deepspeed: str = opt("zero2", "DeepSpeed JSON template: a path, or zero1|zero2|zero3|zero2_offload|zero3_offload")
    config: Optional[str] = opt(None, "JSON or YAML file of settings (overridden by flags given on the command line)",
                                compare=False)
    dist_timeout: float = opt(30.0, "minutes a collective may wait for the other ranks before the job ends "
                                    "(a hung or dead rank)", minimum=0.1)
    local_rank: int = opt(-1, "set by the DeepSpeed launcher; ignored (ranks come from the environment)", compare=False)
    # -- the components (their options are flat flags too)
    rosa: RosaConfig = field(default_factory=RosaConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    explicit: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_options(self)
        if self.lr is None:
            self.lr = method_of(self.method).default_lr(self.data.task)
        if not self.lr > 0:
            raise OptionError("TrainConfig", "lr", f"must be a positive number, got {self.lr}; fix: e.g. --lr 5e-4")
        self.explicit = frozenset(self.explicit)
        self._check_cross_fields()

    def _check_cross_fields(self) -> None:
        if self.model.endswith(".gguf") and not Path(self.model).is_file():
            raise ConfigError(f"--model {self.model} not found; fix: give an existing .gguf file")
        method_of(self.method).check(self)
        if self.overwrite_output_dir and self.resume:
            raise ConfigError("--overwrite-output-dir deletes the checkpoints --resume would continue from; "
                              "fix: give one of them")
        if self.optim == "adamw8bit" and not is_installed("bitsandbytes"):
            raise ConfigError("--optim adamw8bit needs bitsandbytes; fix: pip install bitsandbytes or use --optim "
                              "adamw")
        resolve_template(self.deepspeed)
        for flag, value in (("max_shard_size", self.max_shard_size), ("max_memory", self.max_memory)):
            try:
                if value is not None:
                    parse_size(value)
            except ValueError as exc:
                raise ConfigError(f"--{flag.replace('_', '-')} {exc}") from None

    @classmethod
    def from_flat(cls, values: Optional[dict] = None, explicit=()) -> TrainConfig:
        """Build from flat option names (as the command line and config files give them): each
        value goes to the component that declares it; errors name the flag."""
        values, explicit = dict(values or {}), frozenset(explicit)
        task = values.get("task", DataConfig.task)
        for name, value in {**JOB_DEFAULTS, **task_of(task).defaults}.items():
            if name not in explicit and name not in values:
                values[name] = value
        try:
            parts = {attr: comp(**{f.name: values.pop(f.name) for f in flag_fields(comp) if f.name in values},
                                **{f: values[f] for f, owners in SHARED.items() if attr in owners and f in values})
                     for attr, comp in COMPONENTS}
            return cls(**values, **parts, explicit=explicit)
        except OptionError as exc:
            raise exc.for_flag() from None

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

    def to_dict(self) -> dict:
        """Run settings as flat JSON values (launcher/bookkeeping options left out)."""
        return {name: _jsonable(getattr(owner, name)) for name, owner in self.options().items()
                if name not in NOT_SAVED}

    def options(self) -> dict[str, Any]:
        """Flat option name -> the config object holding it (self or a component)."""
        out = {f.name: self for f in flag_fields(self)}
        for attr, comp in COMPONENTS:
            out.update({f.name: getattr(self, attr) for f in flag_fields(comp)})
        return out

    def replace(self, **flat) -> TrainConfig:
        """A copy with some flat options changed (validated again)."""
        values = {name: getattr(owner, name) for name, owner in self.options().items()}
        return TrainConfig.from_flat({**values, **flat}, self.explicit)


# ---------------------------------------------------------------- reading and writing

def all_flag_fields() -> list[tuple[type, dataclasses.Field]]:
    """(owning class, field) of every flat option: the recipe's own first, then each component's."""
    out = [(TrainConfig, f) for f in flag_fields(TrainConfig)]
    out += [(comp, f) for _, comp in COMPONENTS for f in flag_fields(comp)]
    return out


def parse_args(argv: Optional[list] = None) -> TrainConfig:
    """defaults < --config file < flags given; ``explicit`` = options set by the file or the flags."""
    given = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    alias = given.pop("deepspeed_config", None)
    if alias is not None:
        if "deepspeed" in given and given["deepspeed"] != alias:
            raise ConfigError(f"--deepspeed {given['deepspeed']} and --deepspeed_config {alias} differ; fix: give one")
        given["deepspeed"] = alias
    from_file = load_config_file(given["config"]) if given.get("config") else {}
    values = {**from_file, **given}
    explicit = (set(from_file) | set(given)) - set(NOT_SAVED)
    return TrainConfig.from_flat(values, explicit)


def load_config_file(path: Union[str, Path]) -> dict:
    """Settings from a JSON or YAML file; unknown keys are an error that lists them all."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path} not found; fix: give an existing JSON or YAML file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; both mean a malformed file
        raise ConfigError(f"--config {path} cannot be parsed ({type(exc).__name__}: {exc}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of setting names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for _, f in all_flag_fields()} - set(NOT_SAVED)
    unknown = sorted(set(data) - known)
    if unknown:
        hints_ = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                  for k in unknown]
        raise ConfigError(f"--config {path} has unknown settings: {', '.join(hints_)}; fix: remove or rename them")
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
    values = {"micro_batch": ds_config["train_micro_batch_size_per_gpu"],
              "grad_accum": ds_config["gradient_accumulation_steps"], "precision": precision(ds_config)}
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    for key in ("lr", "weight_decay"):
        if key in params:
            values[key] = float(params[key])
    return cfg.replace(**values)


# ---------------------------------------------------------------- argparse from the dataclasses

class OneLineParser(argparse.ArgumentParser):
    """A flag argparse rejects (unknown, bad choice, missing value) is a ValueError like every
    other bad input: one line from the CLI, not the whole usage text (``--help`` shows that)."""

    def error(self, message: str):
        raise ConfigError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    """One flag per option (``--micro-batch``), with its help; defaults are suppressed so the
    namespace holds only the flags actually given (that is how ``explicit`` is known)."""
    parser = OneLineParser(
        prog="train.py", description="Fine-tune an LLM with ROSA on DeepSpeed ZeRO.",
        argument_default=argparse.SUPPRESS)
    for owner, f in all_flag_fields():
        flags = [flag_name(f.name)] + ([f"--{f.name}"] if f.name == "local_rank" else [])
        parser.add_argument(*flags, dest=f.name, help=_help(f), **_argparse_type(owner, f))
    parser.add_argument("--deepspeed_config", dest="deepspeed_config", metavar="PATH",
                        help="alias of --deepspeed (the name DeepSpeed's own argument parser uses)")
    return parser


def _help(f: dataclasses.Field) -> str:
    text = help_text(f)
    if f.name in JOB_DEFAULTS:  # the default job's value, not the component's library default
        text = text.rsplit(" (default: ", 1)[0] + f" (default: {JOB_DEFAULTS[f.name]})"
    return text


def _argparse_type(owner: type, f: dataclasses.Field) -> dict:
    hint = hints(owner)[f.name]
    kinds = allowed_types(hint)
    base = kinds[0] if len(kinds) == 1 else None
    kw = dict(f.metadata["argparse"])
    if base is bool:
        return {"action": argparse.BooleanOptionalAction, **kw}
    if f.metadata["choices"] and not is_optional(hint):  # optional ones: "none" or a choice, checked by the owner
        kw["choices"] = list(f.metadata["choices"])
    elif base is str and is_optional(hint):
        kw["type"] = _optional(str)
    elif base in (int, float):
        kw["type"] = _optional(base) if is_optional(hint) else base
    if not kw.get("choices"):
        kw.setdefault("metavar", {int: "N", float: "X"}.get(base, f.name.upper()))
    return kw


def _optional(base: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "all") else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, set, frozenset)) else value
