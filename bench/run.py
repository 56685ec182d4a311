"""Benchmark suites: ROSA vs PEFT LoRA vs full fine-tuning, side by side in one invocation.

    python bench/run.py --suite quick            # CPU, <= 30 min on 2 cores (committed results)
    python bench/run.py --suite full             # a GPU node
    python bench/run.py --suite quick --only rosa-r8,lora-r8   # rerun some runs, keep the others
    python bench/run.py --suite quick --report-only [--recollect]   # rebuild Markdown and plots
    python bench/run.py --suite study [--scale full] [--stop-after MIN]   # ROSA vs LoRA study (bench/study.py)

Each run is a real `deepspeed --num_gpus N launch/train.py` job on the suite's shared flags
(same model, data, seed, steps, DeepSpeed config), so the numbers are what users get. Results go
to bench/results/<suite>.json (rewritten after every run: an interrupted suite keeps what it
finished), then bench/results/<suite>.md and PNG plots via bench/report.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.collect import collect  # noqa: E402
from bench.hardware import describe  # noqa: E402
from bench.suites import SUITES, Run, Suite  # noqa: E402


def deepspeed_cmd(suite: Suite, run: Run, out: Path) -> list[str]:
    launcher = shutil.which("deepspeed", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                               os.environ.get("PATH", "")]))
    if launcher is None:
        raise SystemExit("bench: the `deepspeed` launcher is not installed next to this Python; run `make setup`")
    return [launcher, "--num_gpus", str(suite.nproc), "--master_port", str(_free_port()), str(ROOT / "launch/train.py"),
            "--deepspeed", str(ROOT / suite.deepspeed), *suite.flags, *run.args(), "--output-dir", str(out)]


def _free_port() -> int:
    from rosa_ds.utils.dist import free_port

    return free_port()


def run_one(suite: Suite, run: Run, runs_dir: Path) -> dict:
    out = runs_dir / suite.name / run.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PATH=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    try:
        import torch

        if not torch.cuda.is_available():  # one thread per CPU rank: ranks do not fight over cores
            env["OMP_NUM_THREADS"] = str(max(1, (len(os.sched_getaffinity(0)) // suite.nproc)))
    except ImportError:
        pass
    cmd = deepspeed_cmd(suite, run, out)
    start = time.perf_counter()
    with open(out / "launcher.log", "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=suite.timeout_s)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    record = {"name": run.name, "method": run.method, "rank": run.rank, "flags": list(run.flags),
              "group": run.group, "wall_seconds": round(wall, 1), "returncode": rc, "output_dir": str(out)}
    if rc != 0:
        tail = (out / "launcher.log").read_text()[-3000:]
        record["error"] = tail
        print(f"  FAILED ({rc}); last lines:\n{tail}", flush=True)
        return record
    record.update(collect(out))
    return record


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--suite" in argv and argv[argv.index("--suite") + 1:][:1] == ["study"]:
        from bench.study import main as study_main  # its own driver: tuned, multi-seed, resumable

        i = argv.index("--suite")
        return study_main(argv[:i] + argv[i + 2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        from dataclasses import replace

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
