"""The study's plan: its scales, its runs and which of them are named next, from the records so
far (pure: no training, no files). Shared by the driver (``bench.study``) and the report
(``bench.study_report``); the design it implements is in ``bench/study.py``'s docstring."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DIVERGED = 3  # the trainer's exit code for a non-finite loss (--nan-policy stop)
MAX_GRID_STEPS = 2  # factor-2 extensions of a learning-rate grid whose best rate is at its edge
SCORES = ("test_loss", "exact_match")  # a record holding one was scored (LM test split; memorized facts)
MAX_ATTEMPTS = 2  # sittings that may try a failing (not diverged) run before it is given up


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale of the study. ``train`` None = every article not in val/test."""

    name: str
    train: Optional[int]
    val: int
    test: int
    epochs: int
    micro_batch: int
    nproc: int
    resample_every: int  # optimizer steps: half an epoch, so each run has several resamples
    lrs: dict = field(default_factory=dict)
    ranks: tuple = (2, 8, 32)
    seeds: tuple = (0, 1, 2)
    seq_len: int = 128
    cls_train: int = 512
    cls_test: int = 400
    timeout_s: int = 3600
    results_stem: str = "study"

    def shared_flags(self) -> tuple[str, ...]:
        return ("--model", "default", "--seq-len", str(self.seq_len), "--micro-batch", str(self.micro_batch),
                "--epochs", str(self.epochs), "--max-train-samples", "none", "--max-eval-samples", "none",
                "--num-samples", "0")


ADAPTER_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3)
FULL_LRS = (1e-5, 2e-5, 5e-5, 1e-4)
SCALES = {
    # 2 CPU ranks: 512 articles / (2 x 4) = 64 steps per epoch, 2 epochs, a resample every 32 steps
    # (3 per run); ~7 min per adapter run on 2 cores, 60 runs.
    "cpu": Scale("cpu", train=512, val=150, test=200, epochs=2, micro_batch=4, nproc=2, resample_every=32,
                 lrs={"rosa": ADAPTER_LRS, "lora": ADAPTER_LRS, "full": FULL_LRS}, timeout_s=2400),
    # one 8-GPU node: every other article (1,875) / (8 x 4) = 58 steps per epoch, 3 epochs
    "full": Scale("full", train=None, val=150, test=200, epochs=3, micro_batch=4, nproc=8, resample_every=29,
                  lrs={"rosa": ADAPTER_LRS, "lora": ADAPTER_LRS, "full": FULL_LRS}, timeout_s=3600,
                  results_stem="study_full"),
}
VARIANTS = {"smallest": ("--strategy", "smallest"), "no-resample": ("--resample-every", "never"),
            "init-lora": ("--init", "lora")}
CLAIM_VARIANTS = ("no-resample", "smallest")  # "resampling helps", "random >= smallest"
CLS_METHODS = (("full", 0), ("lora", 8), ("rosa", 8))


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study. ``config`` groups the seeds of one method, rank and variant."""

    task: str  # lm | cls
    method: str
    rank: int
    seed: int
    lr: Optional[float] = None  # None: the trainer's default for the task and method
    variant: str = ""
    phase: str = "grid"  # grid | seeds | ablation | cls

    @property
    def config(self) -> str:
        body = self.method if self.method == "full" else f"{self.method}-r{self.rank}"
        return f"{self.task}-{body}" + (f"-{self.variant}" if self.variant else "")

    @property
    def name(self) -> str:
        return self.config + (f"-lr{self.lr:g}" if self.lr is not None else "") + f"-s{self.seed}"

    def flags(self, scale: Scale, splits: Path) -> tuple[str, ...]:
        out = ["--seed", str(self.seed)]
        if self.lr is not None:
            out += ["--lr", f"{self.lr:g}"]
        if self.task == "cls":
            return ("--task", "classification", "--dataset", str(splits / "cls_train.jsonl"), "--eval-dataset",
                    str(splits / "cls_test.jsonl"), "--text-field", "text", "--label-field", "label",
                    "--max-train-samples", "none", "--max-eval-samples", "none", *out)
        out = [*scale.shared_flags(), "--dataset", str(splits / "train.jsonl"), "--eval-dataset",
               str(splits / "val.jsonl"), "--prompt-field", "prompt", "--target-field", "target", *out]
        if self.method == "rosa":
            out += ["--resample-every", str(scale.resample_every)]
        return (*out, *VARIANTS.get(self.variant, ()))


# ---------------------------------------------------------------- the plan

def gave_up(rec: Optional[dict]) -> bool:
    """A run that failed ``MAX_ATTEMPTS`` times (not diverged: crashed, timed out, unscored)."""
    return bool(rec) and rec.get("returncode") not in (0, DIVERGED) and rec.get("attempts", 1) >= MAX_ATTEMPTS


def finished(rec: Optional[dict]) -> bool:
    """A run counts as done when it trained and was scored, diverged (a grid outcome), or was
    given up on after ``MAX_ATTEMPTS`` failures (so one broken run cannot hold the study)."""
    if not rec:
        return False
    if rec.get("returncode") == DIVERGED or gave_up(rec):
        return True
    return rec.get("returncode") == 0 and (any(k in rec for k in SCORES) or rec.get("task") == "cls")


def selection_loss(rec: dict) -> float:
    """Validation loss for the rate choice; a diverged, failed or non-finite run is infinite."""
    loss = rec.get("val_loss") if rec.get("returncode") == 0 else None
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else float("inf")


def chosen_lr(grid: list[StudyRun], records: dict) -> Optional[float]:
    """The grid's learning rate with the lowest validation loss (ties: the lower rate), once every
    grid run is finished; None before."""
    if not all(finished(records.get(r.name)) for r in grid):
        return None
    scored = [(selection_loss(records[r.name]), r.lr) for r in grid]
    loss, lr = min(scored)
    return lr if loss != float("inf") else None


def grid(scale: Scale, method: str, rank: int, records: dict) -> list[StudyRun]:
    """The seed-0 learning-rate grid of one method and rank. A best rate at the grid's edge is not
    a tuned rate: the grid grows by one factor-2 step past that edge (up to ``MAX_GRID_STEPS``
    times), so the choice is bracketed by a worse rate on each side, or the limit is reached."""
    return extend_grid(scale.lrs[method], lambda lr: StudyRun("lm", method, rank, scale.seeds[0], lr), records)


def extend_grid(lrs, make: Callable[[float], Any], records: dict, extensions: int = MAX_GRID_STEPS) -> list:
    """The runs ``make(lr)`` over ``lrs``, grown past an edge that holds the best rate (see ``grid``)
    at most ``extensions`` times; any run type with ``name`` and ``lr`` whose records carry ``val_loss``."""
    lrs = list(lrs)
    for _ in range(extensions):
        lr = chosen_lr([make(x) for x in lrs], records)
        if lr is None or lr not in (lrs[0], lrs[-1]):
            break
        if lr == lrs[-1]:
            lrs.append(lr * 2)
        else:
            lrs.insert(0, lr / 2)
    return [make(x) for x in lrs]


def lm_block(scale: Scale, method: str, rank: int, records: dict) -> list[StudyRun]:
    """The grid at seed 0, then the other seeds at the chosen rate once the grid is done."""
    grid_runs = grid(scale, method, rank, records)
    lr = chosen_lr(grid_runs, records)
    seeds = [] if lr is None else [StudyRun("lm", method, rank, s, lr, phase="seeds") for s in scale.seeds[1:]]
    return grid_runs + seeds


def plan(scale: Scale, records: dict) -> list[StudyRun]:
    """Every run that can be named from what is finished, most informative first, so a sitting
    cut short still settles whole claims: classification (cheap), R = 8, the ablations that test
    a claim (``CLAIM_VARIANTS``: three seeds each, one verdict each), R = 2 and 32, the other
    ablations, full fine-tuning (a reference, no verdict rests on it alone)."""
    runs = [StudyRun("cls", m, r, s, phase="cls") for s in scale.seeds for m, r in CLS_METHODS]
    rosa8 = chosen_lr(grid(scale, "rosa", 8, records), records)

    def ablations(variants) -> list[StudyRun]:
        return [] if rosa8 is None else [StudyRun("lm", "rosa", 8, s, rosa8, v, "ablation")
                                         for v in variants for s in scale.seeds]

    def both(rank: int) -> list[StudyRun]:
        return lm_block(scale, "rosa", rank, records) + lm_block(scale, "lora", rank, records)

    runs += both(8) + ablations(CLAIM_VARIANTS)
    for rank in (r for r in scale.ranks if r != 8):
        runs += both(rank)
    runs += ablations(v for v in VARIANTS if v not in CLAIM_VARIANTS)
    return runs + lm_block(scale, "full", 0, records)
