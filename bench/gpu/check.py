"""The GPU verdict in one call: the checks ``bench/gpu/run.sh`` runs after installing the pack.

    python -m bench.gpu.check --out DIR [--deadline-s 400] [--only a,b] [--rehearsal]

Every check runs in its own processes under what is left of one overall deadline, and the JSON and
Markdown verdict (``DIR/gpu_verdict.{json,md}``) are rewritten after each, so a run cut short still
returns what it did. Exit status: 2 when a GPU is visible but torch has no CUDA, 1 when a check
failed, 0 otherwise. ``--rehearsal`` runs the same driver on DeepSpeed's CPU accelerator (gloo,
small sizes; the GPU-only checks are recorded as skipped): the test suite's rehearsal.

Checks, most telling first:
* ``environment``: torch / CUDA / device, the installed pack, what imports;
* ``pair_zero2``, ``pair_zero3`` (bf16): ``bench/gpu/pair_rank.py`` on two ranks of ONE GPU (each
  rank its own NCCL_HOSTID, socket transport), on one rank, and as the CPU fp32 reference: first
  factorization split error, 3 steps, a resample, save, resume bit for bit, sharded export; the
  losses and exported weights compared across the three;
* ``step_llama7b_shape``: ``bench/gpu/step_rank.py``, the 2-layer Llama-7B-shaped model: step time,
  tokens/s, MFU, peak allocated / reserved memory against the accountant, resample time per layer
  on a heavy-tailed spectrum;
* ``factorization``, ``quantization``, ``engine``: ``bench/gpu_check.py``'s one-GPU checks;
* ``zero3_nf4`` (under ``compute-sanitizer`` when the image has it) and ``adamw8bit``:
  ``tests/multirank/scripts/bnb_rank.py`` on the device.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu.compare import pair_verdict
from bench.gpu.install import dist_name

ROOT = Path(__file__).resolve().parents[2]

PAIR_SCRIPT = ROOT / "bench" / "gpu" / "pair_rank.py"
STEP_SCRIPT = ROOT / "bench" / "gpu" / "step_rank.py"
LOAD_SCRIPT = ROOT / "bench" / "gpu" / "load_rank.py"
BNB_SCRIPT = ROOT / "tests" / "multirank" / "scripts" / "bnb_rank.py"
# two ranks on one GPU: NCCL refuses two ranks of one host on one device ("Duplicate GPU"), so each
# rank claims its own host and the ranks talk over sockets, as two nodes would
NCCL_ONE_GPU = {"NCCL_HOSTID": "rosa-gpu-check-{rank}", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1",
                "NCCL_IB_DISABLE": "1", "NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": "lo", "NCCL_DEBUG": "WARN"}
CPU_ACCELERATOR = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, reserve: float = 5.0) -> float:
        return max(0.0, self.end - time.monotonic() - reserve)


def gpu_visible() -> bool:
    """A GPU this process could use, whatever torch says: the driver's device nodes or nvidia-smi."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def launch(script: Path, args: list[str], world: int, timeout: float, env: dict | None = None,
           prefix: list[str] | None = None) -> list[dict]:
    """``world`` ranks of ``script``, each on simulated node ``rank`` (LOCAL_RANK 0: all on one GPU)."""
    from tests.helpers.launch import launch_ranks

    if timeout < 20:
        raise TimeoutError("no time left under the overall deadline")
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in (env or {}).items() if "{rank}" not in v})
    try:
        return launch_ranks(script, args, world_size=world, timeout=timeout, nodes=world,
                            extra_env={k: v for k, v in (env or {}).items() if "{rank}" in v}, prefix=prefix)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def from_the_pack(install: dict) -> dict:
    """For each wheel the install step put into the target: is its distribution found there?"""
    from importlib import metadata


    found = {}
    for wheel in install.get("installed", []):
        try:
            where = str(metadata.distribution(dist_name(Path(wheel))).locate_file(""))
        except metadata.PackageNotFoundError:
            where = ""
        found[wheel] = where.startswith(install["target"])
    return found


def check_environment(ctx) -> dict:
    import importlib

    import torch

    rows = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "gpu_visible": gpu_visible(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        rows.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    for name in ("deepspeed", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "gguf"):
        try:
            module = importlib.import_module(name)
            rows[name] = f"{getattr(module, '__version__', '?')} ({Path(module.__file__).parent.parent})"
        except Exception as exc:  # recorded, not raised: the checks below say what it costs
            rows[name] = f"not importable: {type(exc).__name__}: {str(exc)[:200]}"
    install = ctx.out / "gpu_install.json"
    rows["install"] = json.loads(install.read_text()) if install.exists() else {"error": "no install report"}
    rows["from_the_pack"] = from_the_pack(rows["install"])
    ok = (not rows["deepspeed"].startswith("not importable") and (ctx.rehearsal or rows["cuda_available"])
          and "error" not in rows["install"] and all(rows["from_the_pack"].values()))
    return {"ok": ok, "rows": rows}


def pair_runs(ctx, stage: int) -> dict:
    """The pair check's three runs: 2 ranks and 1 rank on the accelerator (bf16), the CPU fp32
    reference (one per driver: the same function whatever the stage)."""
    runs = {}
    plan = [("world2", 2, "bf16", ctx.accel_env, NCCL_ONE_GPU if ctx.cuda else {}),
            ("world1", 1, "bf16", ctx.accel_env, {}), ("cpu_fp32", 1, "fp32", CPU_ACCELERATOR, {})]
    for name, world, dtype, env, extra in plan:
        work = ctx.scratch / f"pair{stage}_{name}"
        if name == "cpu_fp32" and ctx.reference:
            runs[name] = ctx.reference
            continue
        try:
            results = launch(PAIR_SCRIPT, ["--stage", str(stage if name != "cpu_fp32" else 2), "--dtype", dtype,
                                           "--workdir", str(work)], world, ctx.deadline.left(), {**env, **extra})
            runs[name] = {"results": results, "export": str(work / "export")}
        except Exception as exc:  # an NCCL refusal, a crash, the deadline: the message is the finding
            runs[name] = {"error": str(exc)[-4000:]}
        if name == "world2" and "error" in runs[name] and ctx.cuda:
            # NCCL refused the ranks on one GPU: the best 2-process check left is gloo on the CPU
            fallback = ctx.scratch / f"pair{stage}_gloo"
            try:
                results = launch(PAIR_SCRIPT, ["--stage", str(stage), "--dtype", "bf16", "--workdir", str(fallback)],
                                 2, ctx.deadline.left(), CPU_ACCELERATOR)
                runs["world2_gloo_fallback"] = {"results": results, "export": str(fallback / "export")}
            except Exception as exc:
                runs["world2_gloo_fallback"] = {"error": str(exc)[-4000:]}
    if "error" not in runs["cpu_fp32"]:
        ctx.reference = runs["cpu_fp32"]
    return runs


def check_pair(stage: int):
    def run(ctx) -> dict:
        return pair_verdict(pair_runs(ctx, stage))
    return run


def check_gpu_check(names: list[str]):
    """``bench/gpu_check.py``'s own checks, in a child process (quick sizes in a rehearsal)."""
    def run(ctx) -> dict:
        skip = {"factorization", "quantization", "engine", "cli"} - set(names)
        cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--skip", ",".join(sorted(skip)),
               "--json", str(ctx.scratch / f"gpu_check_{'_'.join(names)}.json")]
        cmd += ["--simulate-cpu"] if ctx.rehearsal else []
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx.deadline.left())
        data = json.loads(Path(cmd[cmd.index("--json") + 1]).read_text()) if proc.returncode in (0, 1) else None
        if data is None:
            return {"ok": False, "rows": {"error": (proc.stdout + proc.stderr)[-4000:]}}
        return {"ok": data["ok"], "rows": data["checks"]}
    return run


def check_bnb(args: list[str], sanitize: bool = False):
    """``bnb_rank.py`` on one rank of the accelerator (bf16); under compute-sanitizer if asked and
    the image has it (an out-of-bounds write then fails the check even if the numbers look right)."""
    def run(ctx) -> dict:
        sanitizer = shutil.which("compute-sanitizer") or next(
            (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if Path(p).exists()), None)
        prefix, note = None, {}
        if sanitize and ctx.cuda:
            if sanitizer:
                prefix = [sanitizer, "--tool", "memcheck", "--error-exitcode", "99"]
                note["compute_sanitizer"] = sanitizer
            else:
                note["compute_sanitizer"] = "not in the image: the run is unsanitized"
        results = launch(BNB_SCRIPT, [*args, "--dtype", "bf16", "--steps-per-epoch", "2", "--epochs", "2"], 1,
                         ctx.deadline.left(), ctx.accel_env, prefix)
        r = results[0]
        ok = all(v == v and abs(v) < 1e3 for v in r["losses"].values()) and r["losses"]
        return {"ok": bool(ok), "rows": {**note, **r}}
    return run


def check_step(ctx) -> dict:
    """``step_rank.py``: speed, MFU, memory against the accountant, resample time per layer (on a
    GPU the 2-layer Llama-7B-shaped model at 1 x 1024 tokens; the tiny Llama in a rehearsal)."""
    shape = ["--model", "tiny-llama", "--seq-len", "32"] if ctx.rehearsal else ["--model", "llama-7b-2layer"]
    r = launch(STEP_SCRIPT, shape, 1, ctx.deadline.left(), ctx.accel_env)[0]
    finite = all(abs(x) < 1e3 for x in r["losses"])
    measured = r.get("device_peak_allocated_bytes")
    if measured:  # the accountant's step peak within a factor 2 of the device's (GPU only)
        r["measured_over_predicted"] = measured / r["predicted_step_peak_bytes"]
    ok = finite and (measured is None or 0.5 <= r["measured_over_predicted"] <= 2.0)
    return {"ok": ok, "rows": r}


def check_load(ctx) -> dict:
    """``load_rank.py``: ZeRO-3 partitioned loading on the accelerator equals ``from_pretrained``
    (every weight bit for bit, the logits of a fixed batch to 1e-6 relative), fp32 and bf16."""
    rows = launch(LOAD_SCRIPT, ["--model", "tiny-llama"], 1, ctx.deadline.left(), ctx.accel_env)[0]["rows"]
    ok = all(not r["params_differing"] and r["partitioned"] and r["logits_max_relative_difference"] <= 1e-6
             for r in rows)
    return {"ok": ok, "rows": {r["dtype"]: r for r in rows}}


CHECKS = {
    "environment": check_environment,
    "load_partitioned": check_load,
    "pair_zero3": check_pair(3),
    "pair_zero2": check_pair(2),
    "step_llama7b_shape": check_step,
    "zero3_nf4": check_bnb(["--stage", "3", "--quantize-base", "nf4"], sanitize=True),
    "adamw8bit": check_bnb(["--stage", "2", "--optim", "adamw8bit"]),
    "factorization_quantization": check_gpu_check(["factorization", "quantization"]),
    "engine": check_gpu_check(["engine"]),
}
REHEARSAL = ["environment", "pair_zero3", "step_llama7b_shape", "load_partitioned"]


class Context:
    def __init__(self, args) -> None:
        import torch

        self.out, self.rehearsal = args.out, args.rehearsal
        self.cuda = torch.cuda.is_available() and not args.rehearsal
        self.accel_env = CPU_ACCELERATOR if args.rehearsal else {}
        self.deadline = Deadline(args.deadline_s)
        self.scratch = Path(tempfile.mkdtemp(prefix="rosa_gpu_check_"))
        self.reference = None


def markdown(data: dict) -> str:
    lines = [f"# GPU verdict: {data['device']}", "", f"Command: `{data['command']}`; {data['seconds']:.0f} s; "
             f"commit {data['commit']}. Overall: **{data['verdict']}**.", ""]
    for name, check in data["checks"].items():
        lines += [f"## {name}: {check['status']} ({check.get('seconds', 0):.0f} s)", "", "```json",
                  json.dumps(check.get("rows"), indent=1, default=str)[:8000], "```", ""]
    return "\n".join(lines)


def write(data: dict, out: Path) -> None:
    import torch

    failed = [n for n, c in data["checks"].items() if c["status"] == "FAILED"]
    data["verdict"] = "FAILED: " + ", ".join(failed) if failed else "passed so far"
    data["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    (out / "gpu_verdict.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "gpu_verdict.md").write_text(markdown(data))


def run_checks(args) -> int:
    import torch

    if gpu_visible() and not torch.cuda.is_available() and not args.rehearsal:
        print(f"gpu-check: a GPU is visible but torch {torch.__version__} has no CUDA; nothing checked")
        return 2
    ctx = Context(args)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    names = [n for n in (args.only.split(",") if args.only else REHEARSAL if args.rehearsal else CHECKS)]
    data = {"command": " ".join(["bench/gpu/check.py", *sys.argv[1:]]), "commit": commit or "unknown",
            "rehearsal": args.rehearsal, "checks": {}, "seconds": 0.0}
    start = time.monotonic()
    for name in names:
        began = time.monotonic()
        try:
            result = CHECKS[name](ctx)
            status = "passed" if result["ok"] else "FAILED"
        except Exception as exc:  # a crash or the deadline is a result too; the other checks still run
            result, status = {"rows": {"error": f"{type(exc).__name__}: {str(exc)[-4000:]}"}}, "FAILED"
        data["checks"][name] = {"status": status, "seconds": round(time.monotonic() - began, 1), **result}
        data["seconds"] = time.monotonic() - start
        write(data, args.out)
        print(f"gpu-check: {name}: {status} ({data['checks'][name]['seconds']:.0f} s)", flush=True)
        if name == "environment" and status == "FAILED":  # no CUDA, or no deepspeed: nothing else can pass
            break
    print(f"gpu-check: {data['verdict']}; {args.out}/gpu_verdict.md")
    return 1 if data["verdict"].startswith("FAILED") else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--deadline-s", type=float, default=400.0)
    ap.add_argument("--only", default="", help=f"comma-separated checks of {', '.join(CHECKS)}")
    ap.add_argument("--rehearsal", action="store_true", help="the CPU accelerator, small sizes, GPU-only skipped")
    return run_checks(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
