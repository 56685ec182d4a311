"""The CUDA path, checked on one GPU in one command (``make gpu-check``, at most ~8 minutes).

    python -m bench.gpu_check                  # on a GPU node: bench/results/gpu_check.{json,md}
    python -m bench.gpu_check --simulate-cpu   # the same script end to end on the CPU accelerator
                                               # (small sizes, no fp16): runs/gpu_check_sim/
    python -m bench.gpu_check --quick          # small sizes on the GPU: runs/gpu_check/

Without CUDA (and without --simulate-cpu) it says so and exits 0. Each check records its numbers
and passes or fails; the exit code is 1 if any failed. Checks:

1. factorization on the device: 4096x4096 and 4096x11008, both solvers, TF32 on and off: the
   split is exact (||W_f + A B - W|| / ||W||), the chosen directions are accurate (backward error
   max |X^T X v - s^2 v| / ||X||_2^2 in fp64), TF32 on changes nothing (the factorization forces
   IEEE fp32), and the time of each;
2. nf4 / int8 quantization on the device vs the CPU (same codes, same dequantized weights);
3. the engine on a tiny model under ZeRO-1/2/3 x bf16/fp16 and ZeRO-3 fp32, one rank per case
   (``bench/gpu_engine_rank.py``): one resample (logits preserved, module = fp32 master, factor
   state reset), a checkpoint round trip (the next loss equal bit for bit), a forced fp16 overflow
   (skipped, not counted), and the training step's peak memory beside the accountant's prediction;
4. the default CLI job for a few steps on one GPU with ROSA / LoRA / full: step-time ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.gpu.check import gpu_visible
from bench.hardware import describe, one_line

ROOT = Path(__file__).resolve().parents[1]

FULL = {"shapes": [(4096, 4096), (4096, 11008)], "quant_shape": (4096, 4096), "cli_steps": 12}
QUICK = {"shapes": [(512, 512), (512, 1376)], "quant_shape": (256, 512), "cli_steps": 4}
ENGINE_CASES = [(1, "bf16"), (2, "bf16"), (3, "bf16"), (1, "fp16"), (2, "fp16"), (3, "fp16"), (3, "fp32")]
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}  # resample: logits change by W_f's storage rounding


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def backward_error(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, wide: bool) -> float:
    """max over chosen directions of |X^T X v - s^2 v| / ||X||_2^2 in fp64 (X tall, v unit)."""
    x = (x.t() if wide else x).double()
    v = (a if wide else b.t()).double()
    v = v / v.norm(dim=0)
    s2 = (x @ v).norm(dim=0) ** 2
    top = torch.linalg.matrix_norm(x, ord=2) ** 2
    return float(((x.t() @ (x @ v)) - s2 * v).norm(dim=0).max() / top)


def check_factorization(dev: torch.device, shapes) -> dict:
    from rosa_ds.config import RosaConfig
    from rosa_ds.factorize import new_factors

    rows, ok = [], True
    for m, n in shapes:
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n)).to(dev) / n ** 0.5
        for solver in ("gram", "svd"):
            results = {}
            for tf32 in (False, True):
                saved = torch.backends.cuda.matmul.fp32_precision
                torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
                try:
                    config = RosaConfig(rank=16, solver=solver)
                    f, seconds = timed(lambda w=w, config=config: new_factors(w, config, 1, 0))
                finally:
                    torch.backends.cuda.matmul.fp32_precision = saved
                split = float((f.w_frozen + f.a @ f.b - w).norm() / w.norm())
                results[tf32] = f
                rows.append({"shape": [m, n], "solver": solver, "tf32": tf32, "seconds": round(seconds, 4),
                             "split_rel_error": split, "backward_error": backward_error(w, f.a, f.b, m < n)})
                ok &= split < 1e-5 and rows[-1]["backward_error"] < 1e-5
            same = bool(torch.equal(results[False].a, results[True].a))
            rows[-1]["tf32_result_identical"] = same
            ok &= same
    return {"ok": ok, "rows": rows}


def check_quantization(dev: torch.device, shape) -> dict:
    from rosa_ds.quant import dequantize, quantize

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    rows, ok = [], True
    for kind in ("nf4", "int8"):
        q_cpu, s_cpu = quantize(w, kind)
        q_dev, s_dev = quantize(w.to(dev), kind)
        d_cpu = dequantize(q_cpu, s_cpu, *shape, kind)
        d_dev = dequantize(q_dev, s_dev, *shape, kind).cpu()
        rows.append({"kind": kind, "codes_equal": bool(torch.equal(q_cpu, q_dev.cpu())),
                     "max_abs_diff_dequantized": float((d_cpu - d_dev).abs().max()),
                     "rel_error_vs_weight": float((d_dev - w).norm() / w.norm())})
        ok &= rows[-1]["max_abs_diff_dequantized"] <= 1e-6 * float(w.abs().max())
    return {"ok": ok, "rows": rows}


def check_engine(cases) -> dict:
    from tests.helpers.launch import launch_ranks

    rows, ok = [], True
    for stage, dtype in cases:
        try:
            r = launch_ranks(ROOT / "bench" / "gpu_engine_rank.py", ["--stage", str(stage), "--dtype", dtype],
                             world_size=1, timeout=300)[0]
        except RuntimeError as exc:
            rows.append({"stage": stage, "dtype": dtype, "error": str(exc)[-3000:]})
            ok = False
            continue
        r["ok"] = (r["logits_rel_change"] <= TOLERANCE[dtype] and r["factors_equal_masters"]
                   and r["factor_state_empty"] and r["resumed_loss_equal"]
                   and r.get("overflow_skipped", True) and r.get("overflow_not_counted", True))
        ok &= r["ok"]
        rows.append(r)
    return {"ok": ok, "rows": rows}


def check_cli(steps: int, world: int = 1) -> dict:
    """The default job for ``steps`` optimizer steps per method; mean step seconds after the first 2."""
    from rosa_ds.utils.dist import free_port

    rows = {}
    out_root = ROOT / "runs" / "gpu_check_cli"
    for method in ("rosa", "lora", "full"):
        out = out_root / method
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port",
               str(free_port()), str(ROOT / "launch" / "train.py"), "--method", method, "--max-steps", str(steps),
               "--epochs", "1", "--max-eval-samples", "8", "--num-samples", "0", "--output-dir", str(out)]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            rows[method] = {"error": (proc.stdout + proc.stderr)[-3000:]}
            continue
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        secs = [r["step_seconds"] for r in recs if "step_seconds" in r][2:]
        rows[method] = {"mean_step_seconds": sum(secs) / max(len(secs), 1), "steps_timed": len(secs)}
    ok = all("error" not in r for r in rows.values())
    if ok:
        t = {m: r["mean_step_seconds"] for m, r in rows.items()}
        rows["ratios"] = {"rosa/lora": t["rosa"] / t["lora"], "rosa/full": t["rosa"] / t["full"]}
    return {"ok": ok, "rows": rows}


def markdown(data: dict) -> str:
    lines = [f"# GPU check: {data['device_name']}", "",
             f"Machine: {one_line(data['hardware'])}. Command: `{data['command']}`, {data['seconds']:.0f} s. "
             f"Overall: **{'passed' if data['ok'] else 'FAILED'}**.", ""]
    for name, check in data["checks"].items():
        lines += [f"## {name}: {'passed' if check['ok'] else 'FAILED'}", "", "```json",
                  json.dumps(check["rows"], indent=1)[:6000], "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--simulate-cpu", action="store_true", help="run every check on the CPU accelerator")
    ap.add_argument("--quick", action="store_true", help="small sizes (implied by --simulate-cpu)")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip: factorization,quantization,engine,cli")
    ap.add_argument("--json", type=Path, help="also write the results here (bench/gpu/check.py reads them)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.simulate_cpu:
        if gpu_visible():  # a GPU node must not "pass" with nothing checked
            print(f"gpu-check: a GPU is visible but torch {torch.__version__} has no CUDA; nothing checked")
            return 2
        print("gpu-check: no CUDA device on this machine; nothing checked (run `make gpu-check` on a GPU node, "
              "or `python -m bench.gpu_check --simulate-cpu` to exercise the script on the CPU)")
        return 0
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.simulate_cpu else "cpu")
    sizes = QUICK if (args.quick or args.simulate_cpu) else FULL
    cases = [c for c in ENGINE_CASES if dev.type == "cuda" or c[1] != "fp16"]  # the CPU accelerator has no fp16
    skip = set(filter(None, args.skip.split(",")))
    checks, start = {}, time.perf_counter()
    plan = {"factorization": lambda: check_factorization(dev, sizes["shapes"]),
            "quantization": lambda: check_quantization(dev, sizes["quant_shape"]),
            "engine": lambda: check_engine(cases), "cli": lambda: check_cli(sizes["cli_steps"])}
    for name, fn in plan.items():
        if name in skip:
            continue
        try:
            checks[name], seconds = timed(fn)
        except Exception as exc:  # a crash is a result too: record it and go on with the other checks
            checks[name], seconds = {"ok": False, "rows": {"error": f"{type(exc).__name__}: {exc}"}}, 0.0
        checks[name]["seconds"] = round(seconds, 1)
        print(f"gpu-check: {name}: {'passed' if checks[name]['ok'] else 'FAILED'} ({seconds:.0f} s)", flush=True)
    data = {"device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU (simulated accelerator)",
            "hardware": describe(), "command": " ".join(["python -m bench.gpu_check", *sys.argv[1:]]),
            "seconds": time.perf_counter() - start, "ok": all(c["ok"] for c in checks.values()), "checks": checks}
    full_run = dev.type == "cuda" and sizes is FULL and not skip  # only a complete GPU run is a committed result
    out = ROOT / ("bench/results" if full_run else "runs/gpu_check_sim" if dev.type == "cpu" else "runs/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1))
    (out / "gpu_check.md").write_text(markdown(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    print(f"gpu-check: {'passed' if data['ok'] else 'FAILED'}; results in {out}/gpu_check.md")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
