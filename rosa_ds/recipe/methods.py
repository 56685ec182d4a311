"""The training methods, one strategy object each: what a method adds to the model, which options
only it takes, what it exports and what a resume must keep.

Adding a method: a ``Method`` subclass here and its entry in ``METHODS``; the command line
(``--method``), the checks, the build, the export and the resume facts all read it from there.
(The memory accountant, ``rosa_ds.memory``, keeps its own arithmetic per method: it sits below the
recipe and must not import it.)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from torch import nn

from ..config import RosaConfig
from ..errors import ConfigError
from ..utils.options import flag_name


@dataclass(frozen=True)
class Method:
    """A training method. ``lrs``: default peak learning rate per task name (``causal_lm`` is the
    fallback for a task without its own entry); ``owns``: options only this method takes, each
    with the test of whether it is set away from its default."""

    name: str
    lrs: dict
    help: str
    owns: ClassVar[dict[str, Callable[[Any], bool]]] = {}
    adapter: ClassVar[bool] = True  # trains low-rank factors of rank ``--rank``
    quantizes: ClassVar[bool] = False  # can keep its frozen base quantized (``--quantize-base``)

    def default_lr(self, task: str) -> float:
        return self.lrs.get(task, self.lrs["causal_lm"])

    def check(self, cfg) -> None:
        """Options of another method given to this one: one line naming the flag and the fix."""
        for other in METHODS.values():
            for option, is_set in other.owns.items():
                if other is not self and is_set(cfg):
                    flag = flag_name(option)
                    raise ConfigError(f"{flag} applies to --method {other.name} only (got --method {self.name}); "
                                      f"fix: drop {flag} or use --method {other.name}")

    def prepare(self, model: nn.Module, cfg, keep: tuple) -> tuple[nn.Module, Optional[RosaConfig]]:
        """(the model the engine trains, the ROSA config the engine injects, if any); ``keep``:
        modules trained in full beside the method (e.g. a classification head)."""
        return model, None

    def save_kwargs(self, module: nn.Module) -> dict:
        """Extra arguments of ``rosa_ds.ds.export.save_model`` for this method's trained module."""
        return {}

    def resume_facts(self, cfg) -> dict:
        """Settings of this method a checkpoint must share with the run resuming it."""
        return {"rank": cfg.rosa.rank} if self.adapter else {}

    def quantize_base(self, cfg) -> Optional[str]:
        """The frozen base's storage format (``--quantize-base``; None: the training dtype)."""
        return cfg.rosa.quantize_base if self.quantizes else None

    def describe(self, report) -> str:
        return f"{self.name}: trainable {report.trainable:,} of {report.total:,} parameters"


class Rosa(Method):
    owns = {"quantize_base": lambda cfg: cfg.rosa.quantize_base is not None}
    quantizes = True

    def prepare(self, model, cfg, keep):
        return model, dataclasses.replace(cfg.rosa, modules_to_save=keep)

    def resume_facts(self, cfg) -> dict:
        return {**super().resume_facts(cfg), "quantize_base": cfg.rosa.quantize_base}

    def describe(self, report) -> str:
        return f"{super().describe(report)}, rho {report.rho:.1f}"


class Lora(Method):
    owns = {"lora_init": lambda cfg: cfg.lora_init != "peft"}

    def prepare(self, model, cfg, keep):
        from .baselines import apply_lora

        return apply_lora(model, cfg.rosa.rank, cfg.rosa.target_modules, keep, init=cfg.lora_init), None

    def save_kwargs(self, module) -> dict:
        from .baselines import is_lora_layer, lora_transform

        return {"transform": lora_transform(module), "is_unit": is_lora_layer, "describe": module.get_base_model()}


class Full(Method):
    adapter = False


# Peak learning rates that suit short runs: adapters tolerate ~25x more than full fine-tuning.
# Classification trains a newly initialised head (and the pooler's inputs) from scratch in 64 steps,
# which needs ~4x the LM rates. Measured on MiniLM-L6 / bbc-topics, 64 steps of 8, 200 held-out
# articles, one process: ROSA r=8 reaches 66% accuracy at 5e-4 and 93% at 2e-3; full FT 91% by
# step 32 at 1e-4.
METHODS: dict[str, Method] = {m.name: m for m in (
    Rosa("rosa", {"causal_lm": 5e-4, "classification": 2e-3}, "rosa (random subspace adaptation)"),
    Lora("lora", {"causal_lm": 5e-4, "classification": 2e-3}, "lora (peft baseline)"),
    Full("full", {"causal_lm": 2e-5, "classification": 1e-4}, "full fine-tuning"),
)}


def method_of(name: str) -> Method:
    return METHODS[name]
