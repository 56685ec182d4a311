"""Benchmark suites: ROSA vs PEFT LoRA vs full fine-tuning, side by side in one invocation.

    python -m bench.run --suite quick            # CPU, <= 30 min on 2 cores (committed results)
    python -m bench.run --suite full             # a GPU node
    python -m bench.run --suite quick --only rosa-r8,lora-r8   # rerun some runs, keep the others
    python -m bench.run --suite quick --report-only [--recollect]   # rebuild Markdown and plots
    python -m bench.run --suite study [--scale full] [--stop-after MIN]   # ROSA vs LoRA study (bench/study.py)
    python -m bench.run --suite capacity [--scale full] [--stop-after MIN]   # where ROSA beats LoRA (bench/capacity.py)

From the repository root. Each run is a real `deepspeed --num_gpus N launch/train.py` job on the
suite's shared flags (same model, data, seed, steps, DeepSpeed config), so the numbers are what
users get (bench/train_run.py). Results go to bench/results/<suite>.json (rewritten after every
run: an interrupted suite keeps what it finished; each run records the code commit it ran, the
suite its machine), then bench/results/<suite>.md and PNG plots via bench/report.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from bench import capacity, report, study
from bench.collect import collect
from bench.hardware import describe
from bench.suites import SUITES
from bench.train_run import run_one

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    drivers = {"study": study.main, "capacity": capacity.main}  # own drivers: tuned, multi-seed, resumable
    if "--suite" in argv and argv[argv.index("--suite") + 1:][:1] and argv[argv.index("--suite") + 1] in drivers:
        i = argv.index("--suite")
        return drivers[argv[i + 1]](argv[:i] + argv[i + 2:])
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--only", default="", help="comma-separated run names to (re)run; the others are kept")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/bench", help="training output dirs (not committed)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--recollect", action="store_true",
                   help="with --report-only: read every run's metrics again from its output dir")
    p.add_argument("--nproc", type=int, default=None, help="ranks per run (default: the suite's; full: 8 GPUs)")
    a = p.parse_args(argv)
    suite = SUITES[a.suite]
    if a.nproc:
        suite = replace(suite, nproc=a.nproc)
    a.results.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{suite.name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not a.report_only:
        names = [n for n in a.only.split(",") if n]
        unknown = sorted(set(names) - {r.name for r in suite.runs})
        if unknown:
            raise SystemExit(f"bench: unknown run(s) {', '.join(unknown)} in suite {suite.name}; "
                             f"choose from {', '.join(r.name for r in suite.runs)}")
        todo = [r for r in suite.runs if not names or r.name in names]
        kept = [r for r in data.get("runs", []) if names and r["name"] not in names]
        data = {"suite": suite.name, "description": suite.description, "task": suite.task,
                "flags": list(suite.flags), "deepspeed": suite.deepspeed, "nproc": suite.nproc,
                "hardware": describe(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "runs": kept}
        suite_start = time.perf_counter()
        for i, run in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {suite.name}/{run.name}: {' '.join(run.args())}", flush=True)
            record = run_one(suite, run, a.runs_dir)
            data["runs"] = [r for r in data["runs"] if r["name"] != run.name] + [record]
            data["runs"].sort(key=lambda r: [x.name for x in suite.runs].index(r["name"]))
            data["suite_wall_seconds"] = round(time.perf_counter() - suite_start, 1)
            path.write_text(json.dumps(data, indent=1))
            print(f"  {record['wall_seconds']:.0f}s  final eval loss {record.get('eval_loss_final')}", flush=True)
    if a.report_only and a.recollect:
        for record in data.get("runs", []):
            if record.get("returncode") == 0 and Path(record["output_dir"]).is_dir():
                record.update(collect(Path(record["output_dir"])))
        path.write_text(json.dumps(data, indent=1))
    md = report.write(path)
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
