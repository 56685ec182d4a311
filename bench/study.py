"""The ROSA vs LoRA study: tuned learning rates, three seeds, test-split loss and generation metrics.

    python -m bench.run --suite study                      # CPU scale; resumable, run it again to go on
    python -m bench.run --suite study --stop-after 90      # start no new run after 90 minutes
    python -m bench.run --suite study --plan               # what is done and what is left, no training
    python -m bench.run --suite study --scale full         # one 8-GPU node (bench/results/study_full.*)

Design (the plan and the sizes per scale: ``bench/study_plan.py``):

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
import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from bench import study_report
from bench.hardware import describe
from bench.study_plan import SCALES, Scale, StudyRun, finished, plan
from bench.suites import Run, Suite
from bench.textmetrics import rouge_tokens
from bench.train_run import run_one

ROOT = Path(__file__).resolve().parents[1]

SPLIT_SEED = 20261201  # the one shuffle the splits are cut from

# ---------------------------------------------------------------- the splits

def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def duplicate_groups(recs: list) -> list[list]:
    """Articles grouped so that no two groups share a lead paragraph or a headline (normalised:
    lower-cased ``[a-z0-9]`` words). The BBC corpus repeats ~160 leads and ~130 headlines under
    different file names; a split cut from whole groups cannot put one text in two splits."""
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
    """Train (a real deepspeed launch, as the suites do), score the export, drop the weights."""
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
        cmd = [sys.executable, "-m", "bench.study_eval", "--model", str(out / "final_model"),
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


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


@contextmanager
def one_sitting(path: Path, label: str):
    """Hold an exclusive lock on ``path``'s sitting for the sitting's whole length: a second sitting
    on the same results would train the same run into the same directory (each run's directory is
    emptied first, so even the trainer's own output-dir lock would be deleted under it) and both
    would rewrite the results file. The kernel drops the lock when the process ends, however it ends."""
    lock = path.with_suffix(".sitting.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SystemExit(f"{label}: another sitting is running on {path} ({f.read().strip() or 'pid unknown'}); "
                             "fix: wait for it to end (or stop it), then run this again") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        f.flush()
        yield


def drive(scale: Scale, path: Path, runs_dir: Path, stop_after_s: Optional[float] = None,
          max_runs: Optional[int] = None, runner: Callable = execute, splits_root: Optional[Path] = None,
          planner: Callable = plan, prepare: Callable = write_splits, label: str = "study") -> dict:
    """Run what is left of ``planner``'s plan (re-planned after every run), saving after each;
    ``prepare(scale, root)`` writes the data files once and returns (their dir, a description).
    One sitting at a time per results file (``one_sitting``)."""
    with one_sitting(path, label):
        return _drive(scale, path, runs_dir, stop_after_s, max_runs, runner, splits_root, planner, prepare, label)


def _drive(scale: Scale, path: Path, runs_dir: Path, stop_after_s: Optional[float], max_runs: Optional[int],
           runner: Callable, splits_root: Optional[Path], planner: Callable, prepare: Callable, label: str) -> dict:
    data = load(path, scale)
    splits, desc = prepare(scale, splits_root or runs_dir / f"{label}-{scale.name}")
    if data.get("splits", desc) != desc:
        raise SystemExit(f"{label}: the split files differ from the ones {path} was run on ({data['splits']} vs "
                         f"{desc}); the corpus or the split code changed: start a new results file")
    data["splits"] = desc
    sitting = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": describe(),
               "runs": [], "wall_seconds": 0.0}  # the hardware record names the code commit too
    data["sittings"].append(sitting)
    # wall clock, not perf_counter: a suspended VM's monotonic clock stops, and --stop-after means wall time
    start, tried = time.time(), set()
    while True:
        todo = [r for r in planner(scale, data["runs"])
                if not finished(data["runs"].get(r.name)) and r.name not in tried]
        if not todo or (max_runs is not None and len(sitting["runs"]) >= max_runs):
            break
        if stop_after_s is not None and time.time() - start > stop_after_s:
            break
        run = todo[0]
        tried.add(run.name)
        print(f"[{label} {scale.name}] {run.name} ({len(todo)} named runs left)", flush=True)
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


def first_of(runs: list, names: tuple[str, ...]) -> list:
    """``runs`` with those named in ``names`` moved to the front, in that order; the rest keep theirs."""
    front = [r for n in names for r in runs if r.name == n]
    return front + [r for r in runs if r.name not in names]


def _first_planned(planner: Callable, names: tuple[str, ...], scale, runs: dict) -> list:
    return first_of(planner(scale, runs), names)


def main(argv: list[str] | None = None) -> None:
    cli(argv, "python -m bench.run --suite study", __doc__, SCALES, plan, drive, study_report.write)


def cli(argv: Optional[list[str]], prog: str, doc: str, scales: dict, planner: Callable, driver: Callable,
        write: Callable) -> None:
    """The resumable driver's command line (the study's and the capacity suite's): train what is
    left with ``driver``, or only ``--plan`` / ``--report-only``; then ``write`` the report."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(scales), default="cpu")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench", help="training output dirs (not committed)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                   help="start no new run after this many minutes (the one running finishes)")
    p.add_argument("--max-runs", type=int, default=None, help="run at most N runs in this sitting")
    p.add_argument("--first", default="", metavar="RUN[,RUN]",
                   help="run these named runs before the plan's order (e.g. the run that can end a candidate)")
    p.add_argument("--plan", action="store_true", help="print what is done and what is left; train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the JSON")
    a = p.parse_args(argv)
    scale = scales[a.scale]
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{scale.results_stem}.json"
    first = tuple(n for n in a.first.split(",") if n)
    if first:
        runs = load(path, scale)["runs"]
        named = {r.name for r in planner(scale, runs)}
        for n in first:
            if n not in named or finished(runs.get(n)):
                state = "is finished" if n in named else "is not a run the plan names now"
                raise SystemExit(f"{prog}: --first {n} {state}; fix: pick an unfinished run from `{prog} --plan`")
        planner = functools.partial(_first_planned, planner, first)
    if a.plan:
        data = load(path, scale)
        for r in planner(scale, data["runs"]):
            rec = data["runs"].get(r.name)
            print(f"{'done' if finished(rec) else 'todo'}  {r.name}  ({r.phase})")
        return
    if not a.report_only:
        driver(scale, path, a.runs_dir, None if a.stop_after is None else a.stop_after * 60, a.max_runs,
               planner=planner)
    md = write(path, scale)
    print(f"wrote {path} and {md}")

if __name__ == "__main__":
    main()
