"""One benchmark training run: a real ``deepspeed --num_gpus N launch/train.py`` job on a suite's
shared flags plus the run's own, its metrics read back by ``bench.collect``. Used by the suites
(``bench.run``) and the study (``bench.study``), so both measure what users get."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.collect import collect
from bench.hardware import code_commit
from bench.suites import Run, Suite
from rosa_ds.utils.dist import free_port

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_cmd(suite: Suite, run: Run, out: Path) -> list[str]:
    launcher = shutil.which("deepspeed", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                               os.environ.get("PATH", "")]))
    if launcher is None:
        raise SystemExit("bench: the `deepspeed` launcher is not installed next to this Python; run `make setup`")
    return [launcher, "--num_gpus", str(suite.nproc), "--master_port", str(free_port()), str(ROOT / "launch/train.py"),
            "--deepspeed", str(ROOT / suite.deepspeed), *suite.flags, *run.args(), "--output-dir", str(out)]


def run_one(suite: Suite, run: Run, runs_dir: Path) -> dict:
    """Train ``run`` into ``runs_dir/<suite>/<run>`` (emptied first) and return its record: identity,
    wall time, return code, the code commit it ran, and the collected metrics (or the log's tail)."""
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
              "group": run.group, "wall_seconds": round(wall, 1), "returncode": rc, "output_dir": str(out),
              "commit": code_commit()}
    if rc != 0:
        tail = (out / "launcher.log").read_text()[-3000:]
        record["error"] = tail
        print(f"  FAILED ({rc}); last lines:\n{tail}", flush=True)
        return record
    record.update(collect(out))
    return record
