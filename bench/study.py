"""The ROSA vs LoRA study: tuned learning rates, three seeds, test-split loss and generation metrics.

    python bench/run.py --suite study                      # CPU scale; resumable, run it again to go on
    python bench/run.py --suite study --stop-after 90      # start no new run after 90 minutes
    python bench/run.py --suite study --plan               # what is done and what is left, no training
    python bench/run.py --suite study --scale full         # one 8-GPU node (bench/results/study_full.*)

Design (sizes per scale in ``SCALES``):

- Fixed splits of the BBC corpus, drawn once from a seeded shuffle (``SPLIT_SEED``) of whole
  duplicate groups (articles sharing a lead or a headline stay in one split) and written as JSONL:
  headline generation (lead -> headline) test / validation / training articles, and topic
  classification test / training articles. Every run of every seed sees the same articles; the
  run's ``--seed`` changes only the data order, initialisation and ROSA subspaces.
- Causal LM (SmolLM2-135M, every projection of every block): LoRA and ROSA at R in ``ranks``
  (equal trainable counts at equal R) and full fine-tuning. Per method and rank, the learning rate
  is the one of ``lrs`` with the lowest validation loss at seed 0 (a diverged run counts as
  infinite loss; a best rate at the grid's edge extends the grid past it); then seeds 1 and 2
  run at that rate, and the test split scores all three.
  Ablations of ROSA at R = 8, three seeds at ROSA r=8's chosen rate: ``--strategy smallest``,
  ``--resample-every never``, ``--init lora``.
- Classification (MiniLM-L6, BBC topics): ROSA r=8, LoRA r=8 and full fine-tuning at the trainer's
  classification learning rates, three seeds, accuracy and macro-F1 on the test articles.

Resumable: every finished run is written to the results JSON at once and skipped on a rerun
(a rerun with nothing left only rebuilds the report, in seconds). A run that failed is retried
on the next invocation, not in the same one. Each invocation is a "sitting" with its own
hardware record, so runs spread over several machines stay attributed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.hardware import describe  # noqa: E402
from bench.suites import Run, Suite  # noqa: E402

SPLIT_SEED = 20261201  # the one shuffle the splits are cut from
DIVERGED = 3  # the trainer's exit code for a non-finite loss (--nan-policy stop)
MAX_GRID_STEPS = 2  # factor-2 extensions of a learning-rate grid whose best rate is at its edge
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
    return rec.get("returncode") == 0 and ("test_loss" in rec or rec.get("task") == "cls")


def succeeded(rec: Optional[dict]) -> bool:
    return finished(rec) and rec.get("returncode") == 0


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
    lrs = list(scale.lrs[method])
    for _ in range(MAX_GRID_STEPS):
        lr = chosen_lr([StudyRun("lm", method, rank, scale.seeds[0], x) for x in lrs], records)
        if lr is None or lr not in (lrs[0], lrs[-1]):
            break
        if lr == lrs[-1]:
            lrs.append(lr * 2)
        else:
            lrs.insert(0, lr / 2)
    return [StudyRun("lm", method, rank, scale.seeds[0], x) for x in lrs]


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


# ---------------------------------------------------------------- the splits

def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def duplicate_groups(recs: list) -> list[list]:
    """Articles grouped so that no two groups share a lead paragraph or a headline (normalised:
    lower-cased ``[a-z0-9]`` words). The BBC corpus repeats ~160 leads and ~130 headlines under
    different file names; a split cut from whole groups cannot put one text in two splits."""
    from bench.textmetrics import rouge_tokens

    parent = list(range(len(recs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    seen: dict = {}
    for i, r in enumerate(recs):
        lead = r.fields["prompt"].split("\n")[0]
        for text in (lead, r.fields["target"]):
            key = " ".join(rouge_tokens(text))
            if key in seen:
                parent[root(i)] = root(seen[key])
            else:
                seen[key] = i
    groups: dict = {}
    for i, r in enumerate(recs):
        groups.setdefault(root(i), []).append(r.key)
    return list(groups.values())


def _cut(groups: list[list], sizes: list[tuple[str, Optional[int]]]) -> dict[str, list]:
    """Fill each split in turn with whole groups (the shuffled order) until it holds >= its size."""
    out, it = {}, iter(groups)
    for name, size in sizes:
        out[name] = []
        for g in it:
            out[name] += g
            if size is not None and len(out[name]) >= size:
                break
    return out


def write_splits(scale: Scale, root: Path) -> tuple[Path, dict]:
    """Write the scale's split files under ``root`` (idempotent); returns (dir, description)."""
    from rosa_ds.recipe.data.sources import read_bbc

    out = root / "splits"
    out.mkdir(parents=True, exist_ok=True)
    heads = sorted(read_bbc("bbc-headlines").records, key=lambda r: r.key)
    groups = sorted(duplicate_groups(heads))
    random.Random(SPLIT_SEED).shuffle(groups)
    lm = _cut(groups, [("test", scale.test), ("val", scale.val), ("train", scale.train)])
    cls = _cut(groups, [("cls_test", scale.cls_test), ("cls_train", scale.cls_train)])
    desc = {"split_seed": SPLIT_SEED, "duplicate_groups": sum(len(g) > 1 for g in groups)}
    for name, parts in (("bbc-headlines", lm), ("bbc-topics", cls)):
        fields = {r.key: r.fields for r in read_bbc(name).records}
        for part, keys in parts.items():
            rows = [{"key": k, **fields[k]} for k in keys]
            desc[part] = {"articles": len(rows), "sha256_16": _write_jsonl(out / f"{part}.jsonl", rows)}
    return out, desc


# ---------------------------------------------------------------- running

def _compact(rec: dict) -> dict:
    """What the report needs of bench.collect's record (the memory census is in the run dir)."""
    keep = ("steps", "step_seconds_median", "epoch_train_seconds", "resamples", "resample_seconds", "eval_curve",
            "eval_loss_start", "eval_loss_final", "train_loss_last", "accuracy_final", "macro_f1_final")
    out = {k: rec[k] for k in keep if k in rec}
    out["trainable"] = (rec.get("memory") or {}).get("trainable")
    return out


def describe_run(run: StudyRun) -> dict:
    """The record's identity fields, stamped with the start time."""
    return {"name": run.name, "task": run.task, "config": run.config, "method": run.method, "rank": run.rank,
            "seed": run.seed, "lr": run.lr, "variant": run.variant, "phase": run.phase,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def execute(scale: Scale, run: StudyRun, splits: Path, runs_dir: Path) -> dict:
    """Train (a real deepspeed launch, as bench/run.py does), score the export, drop the weights."""
    from bench.run import run_one

    suite = Suite(name=f"study-{scale.name}", description="study", flags=(), runs=(), nproc=scale.nproc,
                  timeout_s=scale.timeout_s, task="classification" if run.task == "cls" else "causal_lm")
    rec = describe_run(run)
    raw = run_one(suite, Run(run.name, run.method, run.rank, run.flags(scale, splits)), runs_dir)
    rec.update(flags=list(run.flags(scale, splits)), train_wall_seconds=raw["wall_seconds"],
               returncode=raw["returncode"])
    out = Path(raw["output_dir"])
    if raw["returncode"] != 0:
        rec["error"] = raw.get("error", "")[-1500:]
        return rec
    rec.update(_compact(raw))
    if run.task == "lm":
        rec["val_loss"] = rec.get("eval_loss_final")  # the trainer's eval split is validation
        scored = out / "study_eval.json"
        cmd = [sys.executable, str(ROOT / "bench/study_eval.py"), "--model", str(out / "final_model"),
               "--split-dir", str(splits), "--out", str(scored), "--seq-len", str(scale.seq_len)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=scale.timeout_s)
        if proc.returncode != 0:
            rec["returncode"], rec["error"] = f"eval {proc.returncode}", proc.stderr[-1500:]
            return rec
        rec.update(json.loads(scored.read_text()))
    for heavy in ("final_model", "checkpoints"):  # ~0.5-1.5 GB per run; the metrics stay
        shutil.rmtree(out / heavy, ignore_errors=True)
    return rec


def load(path: Path, scale: Scale) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    if data and data.get("scale") != scale.name:
        raise SystemExit(f"study: {path} holds scale {data.get('scale')!r}, not {scale.name!r}; "
                         f"fix: pass --scale {data.get('scale')} or --results another directory")
    data.setdefault("scale", scale.name)
    data.setdefault("sittings", [])
    data.setdefault("runs", {})
    return data


def _commit() -> str:
    """The code a sitting ran: HEAD, marked ``+dirty`` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def drive(scale: Scale, path: Path, runs_dir: Path, stop_after_s: Optional[float] = None,
          max_runs: Optional[int] = None, runner: Callable = execute, splits_root: Optional[Path] = None) -> dict:
    """Run what is left of the plan (re-planned after every run), saving after each."""
    data = load(path, scale)
    splits, desc = write_splits(scale, splits_root or runs_dir / f"study-{scale.name}")
    if data.get("splits", desc) != desc:
        raise SystemExit(f"study: the split files differ from the ones {path} was run on ({data['splits']} vs {desc}); "
                         "the corpus or the split code changed: start a new results file")
    data["splits"] = desc
    sitting = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": describe(),
               "commit": _commit(), "runs": [], "wall_seconds": 0.0}
    data["sittings"].append(sitting)
    # wall clock, not perf_counter: a suspended VM's monotonic clock stops, and --stop-after means wall time
    start, tried = time.time(), set()
    while True:
        todo = [r for r in plan(scale, data["runs"]) if not finished(data["runs"].get(r.name)) and r.name not in tried]
        if not todo or (max_runs is not None and len(sitting["runs"]) >= max_runs):
            break
        if stop_after_s is not None and time.time() - start > stop_after_s:
            break
        run = todo[0]
        tried.add(run.name)
        print(f"[study {scale.name}] {run.name} ({len(todo)} named runs left)", flush=True)
        try:
            rec = runner(scale, run, splits, runs_dir)
        except Exception as exc:  # a scorer timeout, an unreadable output: recorded, not fatal to the sitting
            rec = {**describe_run(run), "train_wall_seconds": None, "returncode": f"exception {type(exc).__name__}",
                   "error": str(exc)[-1500:]}
        rec["attempts"] = (data["runs"].get(run.name) or {}).get("attempts", 0) + 1
        rec["sitting"] = len(data["sittings"]) - 1
        data["runs"][run.name] = rec
        sitting["runs"].append(run.name)
        sitting["wall_seconds"] = round(time.time() - start, 1)
        save(path, data)
        print(f"  rc={rec['returncode']} val={rec.get('val_loss')} test={rec.get('test_loss')} "
              f"rouge_l={rec.get('rouge_l')} acc={rec.get('accuracy_final')}", flush=True)
    if not sitting["runs"]:
        data["sittings"].pop()  # a rerun with nothing to do is not a sitting
    save(path, data)
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench", help="training output dirs (not committed)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no new run after this many minutes (the one running finishes)")
    p.add_argument("--max-runs", type=int, default=None, help="run at most N runs in this sitting")
    p.add_argument("--plan", action="store_true", help="print what is done and what is left; train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the JSON")
    a = p.parse_args(argv)
    from bench import study_report

    scale = SCALES[a.scale]
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{scale.results_stem}.json"
    if a.plan:
        data = load(path, scale)
        for r in plan(scale, data["runs"]):
            rec = data["runs"].get(r.name)
            print(f"{'done' if finished(rec) else 'todo'}  {r.name}  ({r.phase})")
        return
    if not a.report_only:
        drive(scale, path, a.runs_dir, None if a.stop_after is None else a.stop_after * 60, a.max_runs)
    md = study_report.write(path, scale)
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
