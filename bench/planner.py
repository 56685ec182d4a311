"""Planner tables: Llama-2-shaped 7B / 13B / 70B on 1 x 24 GB, 1 x 80 GB and 8 x 80 GB GPUs.

    python -m bench.planner     # writes bench/results/planner.{json,md}

Each plan is ``python -m rosa_ds.memory --model bench/configs/llama-<size>.json --budget B
--gpus-per-node G --global-batch 64 --seq-len 4096 --rank 16`` (bf16, padded batches), timed as a
user runs it (a new process: imports, the meta model, every configuration).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.hardware import describe, one_line
from bench.report import save_results

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("7b", "13b", "70b")
CLUSTERS = (("1 x 24 GB", "24GB", 1), ("1 x 80 GB", "80GB", 1), ("8 x 80 GB", "80GB", 8))
TOP = 5


def plan(size: str, budget: str, gpus: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "rosa_ds.memory", "--model", str(ROOT / "bench" / "configs" / f"llama-{size}.json"),
           "--budget", budget, "--gpus-per-node", str(gpus), "--global-batch", "64", "--seq-len", "4096",
           "--rank", "16", "--top", str(TOP), "--json", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return {"seconds": round(seconds, 1), "markdown": proc.stdout, **json.loads(out.read_text())}


def main() -> None:
    results, start = {}, time.perf_counter()
    tmp = ROOT / "runs" / "planner"
    tmp.mkdir(parents=True, exist_ok=True)
    for size in MODELS:
        for name, budget, gpus in CLUSTERS:
            results[f"{size} on {name}"] = plan(size, budget, gpus, tmp / f"{size}-{gpus}x{budget}.json")
            print(size, name, results[f"{size} on {name}"]["seconds"], "s", flush=True)
    lines = ["# Planner: Llama-2-shaped 7B / 13B / 70B", "",
             f"Machine: {one_line(describe())}. Command: `python -m bench.planner` "
             f"({(time.perf_counter() - start) / 60:.1f} min). Global batch 64 x 4096 tokens, bf16, R = 16, padded "
             "batches; budgets in decimal GB per GPU. Peaks include the 2 GiB runtime reserve. Relative cost is the "
             "planner's nominal step-time model (not measured). Wall time per plan: a new process, as a user runs it.",
             ""]
    for key, r in results.items():
        fits = r["fits"]
        lines += [f"## {key} ({r['seconds']} s, {len(fits)} configurations fit)", ""]
        if fits:
            lines += ["| # | configuration | device peak GiB (phase) | host peak GiB | relative cost |",
                      "|---:|---|---:|---:|---:|"]
            for i, c in enumerate(fits[:TOP], 1):
                lines.append(f"| {i} | {c['label']} | {c['device_peak'] / 2**30:.1f} ({c['peak_phase']}) | "
                             f"{c['host_peak'] / 2**30:.1f} | {c['relative_cost']:.2f} |")
        else:
            closest = min(r["misses"], key=lambda m: m["device_over"])
            lines.append(f"Nothing fits. Closest: {closest['label']}: {closest['device_peak'] / 2**30:.1f} GiB, "
                         f"{closest['device_over'] / 2**30:.1f} GiB over.")
        lines.append("")
    slowest = max(r["seconds"] for r in results.values())
    lines += [f"Slowest plan: {slowest} s (target: under 30 s each)."]
    for r in results.values():  # the committed JSON keeps the listed configurations, not all of them
        r.pop("markdown")
        r["n_fits"], r["fits"] = len(r["fits"]), r["fits"][:TOP]
    save_results(ROOT / "bench" / "results", "planner", {"hardware": describe(), "plans": results},
                 "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
