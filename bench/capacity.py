"""Where does ROSA beat LoRA? The capacity suite (issue 30): a capacity-bound LM task, the paper's
protocol, a memorization probe and the rank of the accumulated update ΔW.

    python -m bench.run --suite capacity --plan            # what is done and what is left, no training
    python -m bench.run --suite capacity --stop-after 240  # a sitting: start no new run after 4 h
    python -m bench.run --suite capacity --report-only     # rebuild bench/results/capacity.md
    python -m bench.run --suite capacity --first RUN --max-runs 1   # one named run before the plan's order
    python -m bench.run --suite capacity --scale full      # one 8-GPU node (bench/results/capacity_full.*)
    python -m bench.run --suite capacity --scale cpu-code  # the code corpus (bench/results/capacity_code.*)
    python -m bench.run --suite capacity --scale smoke --results /tmp/cap   # the pipeline in minutes

Design (sizes per scale and the run order: ``bench/capacity_plan.py``; data:
``bench/capacity_data.py``; statistics and verdicts: ``bench/capacity_report.py``):

- Task: continued training of SmolLM2-135M (every projection of every block) on BBC article
  bodies (``cpu-code``: sympy's Python source), 128-token blocks, one pass over ``train_blocks``
  blocks; validation and test blocks come from articles (files) never trained on. The capacity
  check: full FT vs LoRA r=8 (Arm 1's first two blocks); the task is capacity-bound if full FT's
  test loss is lower by ≥ 0.03 nats.
- Arm 1, tuned AdamW: per method a seed-0 learning-rate grid scored on validation, then test
  seeds 1-3 at the chosen rate: full FT, LoRA r=8, ROSA r=8 resampling every 64 steps; then at
  ROSA's rate: every epoch-equivalent (1/3 of the run), each with ``--rewarmup-steps``, and
  without resampling.
- Arm 2, the paper's protocol: plain SGD (``--optim sgd``), one rate for every method (full FT's
  best on validation), LoRA initialised as the paper's code (``--lora-init paper``), ROSA with the
  warmup-decay schedule restarted at each resample (``--restart-schedule``), R = 8 and 32, 2 seeds.
- Memorization: N random name → number facts, ``facts_epochs`` epochs; loss and exact-match
  recall on the facts themselves vs N, LoRA r=8 / ROSA r=8 (resampling every epoch) / full FT.
- ΔW: every test-seed run's update against the pretrained weights (``rosa_ds.spectrum``); the
  number-of-resamples series is ROSA r=8 at one seed and rate with resampling every
  {never, 128, 64, 32, 16} steps. One run per resample count rather than checkpoints inside one
  run: each point is a finished run (its own LR schedule to the end), so the series answers "how
  many resamples in a run of this length", at the cost of 3 extra runs.

Resumable (the study's driver, ``bench.study.drive``): every finished run is written to the
results JSON at once, with its flags, commit, hardware (per sitting), data sizes and seconds; the
exported weights are deleted after scoring and measuring.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from bench import capacity_report
from bench.capacity_data import BlockSizes, write_blocks, write_facts
from bench.capacity_plan import SCALES, CapacityRun, Scale, plan, planned_steps
from bench.study import _compact, cli, describe_run, drive
from bench.suites import Run, Suite
from bench.train_run import run_one
from rosa_ds.recipe.models import model_dir, resolve_model

ROOT = Path(__file__).resolve().parents[1]


def prepare(scale: Scale, root: Path) -> tuple[Path, dict]:
    """Write the blocks and every fact file under ``root/data``; returns (dir, description)."""
    out = root / "data"
    desc = write_blocks(BlockSizes(scale.train_blocks, scale.val_articles, scale.test_articles, scale.corpus,
                                   scale.per_doc), out)
    if scale.facts_ns:
        desc["facts"] = [write_facts(n, out) for n in sorted(set(scale.facts_ns) | {scale.facts_grid_n})]
    return out, desc


def score(run: CapacityRun, out: Path, data: Path, timeout_s: int) -> dict:
    """``bench.capacity_eval`` on the export in its own process (the trainer's ranks have exited)."""
    scored = out / "capacity_eval.json"
    cmd = [sys.executable, "-m", "bench.capacity_eval", "--model", str(out / "final_model"), "--data", str(data),
           "--out", str(scored)]
    if run.phase == "seeds":  # the runs the report reads; a grid run's ΔW would cost ~1 min for nothing
        cmd += ["--base", model_dir(resolve_model("default"))]
    if run.task == "facts":
        cmd += ["--facts", str(run.n_facts)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        return {"returncode": f"eval {proc.returncode}", "error": proc.stderr[-1500:]}
    return json.loads(scored.read_text())


def execute(scale: Scale, run: CapacityRun, data: Path, runs_dir: Path) -> dict:
    """Train (a real deepspeed launch), score and measure the export, drop the weights."""
    suite = Suite(name=f"capacity-{scale.name}", description="capacity", flags=(), runs=(), nproc=scale.nproc,
                  timeout_s=scale.timeout_s)
    rec = {**describe_run(run), "arm": run.arm, "n_facts": run.n_facts, "steps_planned": planned_steps(scale, run)}
    raw = run_one(suite, Run(run.name, run.method, run.rank, run.flags(scale, data)), runs_dir)
    rec.update(flags=list(run.flags(scale, data)), train_wall_seconds=raw["wall_seconds"],
               returncode=raw["returncode"], commit=raw.get("commit"))
    out = Path(raw["output_dir"])
    if raw["returncode"] != 0:
        rec["error"] = raw.get("error", "")[-1500:]
        return rec
    rec.update(_compact(raw))
    rec["val_loss"] = rec.get("eval_loss_final")  # LM: the validation blocks; facts: the facts themselves
    rec.update(score(run, out, data, scale.timeout_s))
    if rec["returncode"] != 0:  # the export stays for a look; the next sitting retrains the run anyway
        return rec
    for heavy in ("final_model", "checkpoints"):
        shutil.rmtree(out / heavy, ignore_errors=True)
    return rec


def drive_capacity(scale: Scale, path: Path, runs_dir: Path, stop_after_s: Optional[float] = None,
                   max_runs: Optional[int] = None, planner=plan) -> dict:
    return drive(scale, path, runs_dir, stop_after_s, max_runs, runner=execute, planner=planner, prepare=prepare,
                 label="capacity")


def main(argv: list[str] | None = None) -> None:
    cli(argv, "python -m bench.run --suite capacity", __doc__, SCALES, plan, drive_capacity, capacity_report.write)


if __name__ == "__main__":
    main()
