"""Faults on the default job, as a cluster user meets them: what each costs in time, steps and data.

    python -m bench.faults                  # writes bench/results/faults.{json,md}
    python -m bench.faults --only hang      # reruns the named faults, keeps the other rows

The default job (SmolLM2-135M, ZeRO-2, 2 ranks under the ``deepspeed`` launcher, fp32 on the CPU),
cut to ``--max-steps 6 --save-every 2``. Each fault is injected at step 4 by
``tests/multirank/scripts/fault_train.py`` (the CLI plus the fault). Measured per fault: seconds
from the fault to the last process of the job gone, the step of the newest intact checkpoint,
optimizer steps lost (completed steps not in any checkpoint), and whether the resumed run's losses
equal the uninterrupted run's bit for bit (no data lost, no step recorded twice).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.hardware import describe, one_line
from bench.report import save_results
from tests.helpers.launch import cli_command

ROOT = Path(__file__).resolve().parents[1]
FAULT_SCRIPT = ROOT / "tests" / "multirank" / "scripts" / "fault_train.py"
SHIM = ROOT / "tests" / "helpers" / "enospc"
WORK = ROOT / "runs" / "faults"
ARGS = ["--deepspeed", "zero2", "--max-steps", "6", "--save-every", "2", "--max-eval-samples", "8",
        "--num-samples", "0"]
STEP = 4  # the fault's step


def launch(out: Path, fault: str = "", rank: int = 0, extra: tuple = (), env: dict | None = None,
           wait: bool = True, rosa_launch: bool = False) -> dict:
    """One job in its own session (``python -m rosa_ds.launch`` in place of ``deepspeed`` with
    ``rosa_launch``); returns exit code, wall seconds, fault time and end time."""
    stamp = out.parent / f"{out.name}.stamp"
    stamp.unlink(missing_ok=True)
    cmd, run_env = cli_command([*ARGS, *extra], out, 2, FAULT_SCRIPT,
                               {"ROSA_FAULT": fault, "ROSA_FAULT_RANK": str(rank), "ROSA_FAULT_STAMP": str(stamp),
                                **(env or {})})
    if rosa_launch:
        cmd = [sys.executable, "-m", "rosa_ds.launch", *cmd[1:]]
    run_env.pop("ROSA_DS_CACHE")  # the user's cache: the default model is converted once, as for `make train`
    start = time.time()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return {"proc": proc, "start": start, "stamp": stamp, "log": out.parent / f"{out.name}.log"}
    code = proc.wait(timeout=900)
    while True:  # the job ends when its last process (an orphaned rank included) is gone
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    end = time.time()
    fault_at = float(stamp.read_text().split()[1]) if stamp.exists() else None
    return {"code": code, "wall_s": round(end - start, 1), "fault_to_end_s": round(end - fault_at, 1) if fault_at
            else None, "log": (out.parent / f"{out.name}.log").read_text()}


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def newest_checkpoint(out: Path) -> int | None:
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().split("_")[1]) if latest.exists() else None


def cli_line(log: str) -> str:
    lines = [ln[ln.index("rosa_ds: "):] for ln in log.splitlines() if "rosa_ds: " in ln and "[rosa_ds]" not in ln]
    return lines[0][:240] if lines else ""


def resume_and_compare(out: Path, reference: dict) -> dict:
    """Resume to the end: are the recomputed losses the uninterrupted run's, each step once?"""
    res = launch(out, extra=("--resume",))
    steps = [r["step"] for r in records(out) if "loss" in r]
    mine = losses(out)
    return {"resume_code": res["code"], "resume_wall_s": res["wall_s"],
            "each_step_once": steps == sorted(set(steps)) == list(range(1, 7)),
            "bitwise_equal": mine == reference}


def scenario(out: Path, fault: str, reference: dict, rank: int = 0, env: dict | None = None,
             resume: bool = True, extra: tuple = (), rosa_launch: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run = launch(out, fault, rank, extra=extra, env=env, rosa_launch=rosa_launch)
    done = [r["step"] for r in records(out) if "loss" in r and r.get("loss") is not None]
    ckpt = newest_checkpoint(out)
    row = {"exit_code": run["code"], "fault_to_end_s": run["fault_to_end_s"],
           "completed_steps": max(done, default=0), "newest_checkpoint": ckpt,
           "steps_lost": max(done, default=0) - (ckpt or 0), "line": cli_line(run["log"])}
    if resume:
        row.update(resume_and_compare(out, reference))
    return row


def damaged_resume(ref_out: Path, reference: dict) -> dict:
    """The reference's step 6 truncated: the resume falls back to step 4 before any weight loads."""
    damaged = WORK / "damaged"
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(ref_out, damaged, ignore=shutil.ignore_patterns("final_model"))
    victim = damaged / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    res = launch(damaged, extra=("--resume",))
    log = res["log"]
    warned = next((ln for ln in log.splitlines() if "is damaged, falling back" in ln), "")
    return {"exit_code": res["code"],
            "warning_before_weights": bool(warned) and log.index(warned) < log.index("[rosa_ds] loaded "),
            "line": next((ln[ln.index("resuming"):] for ln in log.splitlines() if "resuming from" in ln), ""),
            "steps_lost": 2, "bitwise_equal": losses(damaged) == reference, "resume_wall_s": res["wall_s"]}


def disk_full(ref_out: Path, reference: dict) -> dict:
    """ENOSPC on rank 1 at the step-4 save (its budget lets the step-2 save through)."""
    rank1 = sum(f.stat().st_size for f in (ref_out / "checkpoints" / "step_00000006").glob("*rank_1*"))
    full = WORK / "diskfull"
    env = {"PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]),
           "ROSA_DS_TEST_ENOSPC": f"{full / 'checkpoints'}:{int(rank1 * 1.5)}:1"}
    row = scenario(full, "", reference, env=env)
    row["partial_left"] = [str(p) for p in (full / "checkpoints").rglob("*.partial")]
    return row


def second_run(ref_out: Path, reference: dict) -> dict:
    """A second run on the --output-dir of a live one (held before its first step)."""
    live, release = WORK / "live", WORK / "live.release"
    shutil.rmtree(live, ignore_errors=True)
    release.unlink(missing_ok=True)
    first = launch(live, "hold@1", env={"ROSA_FAULT_RELEASE": str(release)}, wait=False)
    while not (live / ".rosa_ds.lock").exists():
        time.sleep(0.2)
    second = launch(live)
    release.write_text("go")
    first["proc"].wait(timeout=900)
    return {"exit_code": second["code"], "refused_after_s": second["wall_s"], "line": cli_line(second["log"]),
            "first_run_exit_code": first["proc"].returncode}


def kill_job(marker: str) -> int:
    """SIGKILL every process whose environment holds ``marker`` (Slurm ends a job step by its cgroup)."""
    killed = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), 9)
                killed += 1
        except OSError:
            continue
    return killed


def slurm_kill(ref_out: Path, reference: dict) -> dict:
    """Through ``python -m rosa_ds.launch``: SIGTERM to its process group during step 4, SIGKILL to
    every process of the job the moment the launcher exits (as Slurm ends the step)."""
    out, release = WORK / "slurm", WORK / "slurm.release"
    shutil.rmtree(out, ignore_errors=True)
    release.unlink(missing_ok=True)
    job = launch(out, f"hold@{STEP}", env={"ROSA_FAULT_RELEASE": str(release)}, wait=False, rosa_launch=True)
    while not job["stamp"].exists() and job["proc"].poll() is None:
        time.sleep(0.2)
    os.killpg(job["proc"].pid, 15)
    fault_at = time.time()
    time.sleep(1.0)  # forwarded within 0.2 s; step 4 then runs with the stop requested
    release.write_text("go")
    code = job["proc"].wait(timeout=900)
    left = kill_job(f"ROSA_FAULT_STAMP={job['stamp']}")
    ckpt = newest_checkpoint(out)
    done = max((r["step"] for r in records(out) if "loss" in r), default=0)
    row = {"exit_code": code, "fault_to_end_s": round(time.time() - fault_at, 1), "killed_after_exit": left,
           "completed_steps": done, "newest_checkpoint": ckpt, "steps_lost": done - (ckpt or 0),
           "line": cli_line(job["log"].read_text())}
    row.update(resume_and_compare(out, reference))
    return row


def frozen_damage(ref_out: Path, reference: dict) -> dict:
    """16 bytes flipped in the frozen record of the newest checkpoint (step 6): the resume falls
    back to step 4, which names the cycle's other copy."""
    out = WORK / "frozen"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("final_model"))
    ckpts = out / "checkpoints"
    key = json.loads((ckpts / "step_00000006" / "rosa_state.json").read_text())["frozen"]
    shard = sorted((ckpts / "frozen" / key).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
    shard.write_bytes(bytes(data))
    res = launch(out, extra=("--resume",))
    log = res["log"]
    return {"exit_code": res["code"], "newest_checkpoint": 4, "steps_lost": 2,
            "line": next((ln[ln.index("checkpoint step_"):] for ln in log.splitlines() if "is damaged, falling" in ln),
                         "")[:240],
            "bitwise_equal": losses(out) == reference, "resume_wall_s": res["wall_s"]}


def changed_micro_batch(ref_out: Path, reference: dict) -> dict:
    """--resume with --micro-batch 2 (the saving run had 4): refused before any weight loads."""
    out = WORK / "microbatch"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("final_model"))
    res = launch(out, extra=("--resume", "--micro-batch", "2"))
    return {"exit_code": res["code"], "refused_after_s": res["wall_s"], "line": cli_line(res["log"]),
            "weights_loaded": "[rosa_ds] loaded " in res["log"]}


def export_full(ref_out: Path, reference: dict) -> dict:
    """ENOSPC on rank 0 after 10 MB of the final export (the finished run resumed: it only exports)."""
    out = WORK / "exportfull"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("final_model"))
    env = {"PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]),
           "ROSA_DS_TEST_ENOSPC": f"{out / '.final_model.tmp'}:{10 << 20}:0"}
    res = launch(out, extra=("--resume",), env=env)
    return {"exit_code": res["code"], "line": cli_line(res["log"]), "traceback": "Traceback" in res["log"],
            "partial_left": [p.name for p in out.glob(".final_model*")]}


SCENARIOS = {  # name: (fault, what happens, runner)
    "sigterm": "SIGTERM to the job's process group (Slurm, Kubernetes)",
    "runner": "SIGTERM to the deepspeed runner alone (ranks orphaned)",
    "sigkill": "SIGKILL of rank 1 (OOM killer)",
    "hang": "rank 1 hangs (--dist-timeout 0.2, 12 s)",
    "hanglaunch": "rank 1 hangs, through python -m rosa_ds.launch (--dist-timeout 0.2, 12 s)",
    "nan": "NaN loss, --nan-policy stop",
    "damaged": "newest checkpoint truncated (resume falls back)",
    "diskfull": "disk full during a save (ENOSPC on rank 1)",
    "second": "a second run on a live --output-dir",
    "slurm": "Slurm-like kill through python -m rosa_ds.launch (SIGTERM to its group, SIGKILL to what is left "
             "when it exits)",
    "frozen": "frozen record of the newest checkpoint damaged (16 bytes flipped; resume falls back)",
    "microbatch": "--resume with a changed --micro-batch (4 -> 2)",
    "exportfull": "disk full during the final export (ENOSPC on rank 0)",
}


def run_one(name: str, ref_out: Path, reference: dict) -> dict:
    print(f"[faults] {SCENARIOS[name]}", flush=True)
    if name in ("sigterm", "runner"):
        row = scenario(WORK / name, f"{name}@{STEP}", reference)
    elif name == "sigkill":
        row = scenario(WORK / name, f"sigkill@{STEP}", reference, rank=1)
    elif name in ("hang", "hanglaunch"):  # the deepspeed runner adds its 30 s SIGTERM grace; rosa_ds.launch 5 s
        row = scenario(WORK / name, f"hang@{STEP}", reference, rank=1, extra=("--dist-timeout", "0.2"),
                       rosa_launch=name == "hanglaunch")
    elif name == "nan":
        row = scenario(WORK / name, f"nan@{STEP}", reference)
    else:
        row = {"damaged": damaged_resume, "diskfull": disk_full, "second": second_run, "slurm": slurm_kill,
               "frozen": frozen_damage, "microbatch": changed_micro_batch,
               "exportfull": export_full}[name](ref_out, reference)
    return {"name": name, "fault": SCENARIOS[name], **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated faults to rerun: {', '.join(SCENARIOS)}")
    only = [n for n in parser.parse_args().only.split(",") if n] or list(SCENARIOS)
    WORK.mkdir(parents=True, exist_ok=True)
    hw = describe()
    t0 = time.time()
    print("[faults] uninterrupted reference", flush=True)
    ref_out = WORK / "reference"
    shutil.rmtree(ref_out, ignore_errors=True)
    ref = launch(ref_out)
    reference = losses(ref_out)
    assert ref["code"] == 0 and sorted(reference) == list(range(1, 7)), ref["log"][-3000:]
    fresh = {name: run_one(name, ref_out, reference) for name in only}
    path = ROOT / "bench" / "results" / "faults.json"
    old = {row.get("name"): row for row in json.loads(path.read_text())["rows"]} if path.exists() and \
        len(only) < len(SCENARIOS) else {}
    rows = [fresh.get(name) or old.get(name) for name in SCENARIOS if fresh.get(name) or old.get(name)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {"hardware": hw, "hardware_line": one_line(hw), "job": "default (SmolLM2-135M, ZeRO-2, 2 ranks, fp32)",
              "args": ARGS, "fault_step": STEP, "reference_losses": reference, "rows": rows,
              "wall_s": round(time.time() - t0, 1), "rerun": only, "commit": commit.strip()}
    save_results(ROOT / "bench" / "results", "faults", result, markdown(result))


def _sitting(r: dict) -> str:
    if len(r.get("rerun", SCENARIOS)) >= len(SCENARIOS):
        return f"wall time of the whole benchmark {r['wall_s']} s."
    return (f"this sitting ran the reference and the rows {', '.join(r['rerun'])} in {r['wall_s']} s; the other "
            "rows are from an earlier sitting (paths under /work/main), kept as they were.")


def markdown(r: dict) -> str:
    out = ["# Faults on the default job", "",
           f"{r['job']}, `{' '.join(r['args'])}`, each fault at step {r['fault_step']}; "
           f"{r['hardware_line']}; commit {r.get('commit', '?')}; " + _sitting(r) +
           " `python -m bench.faults` reruns it (`--only NAME,...` the named rows).", "",
           "| fault | exit code | fault to job end (s) | newest checkpoint | steps lost | resumed run equals the "
           "uninterrupted one bit for bit | each step once in metrics.jsonl |",
           "|---|---|---|---|---|---|---|"]
    notes = ["", "Exit code: what the `deepspeed` command returned. A signal to the whole process group kills the "
             "runner itself at once (-15: killed by SIGTERM, shell code 143) while the ranks finish their step, save "
             "and exit 75; a rank's own code (3, 4, 2; 1 for a lost or hung peer) is passed on by the launcher; 247 is "
             "the launcher passing on -9, the SIGKILLed rank's (`python -m rosa_ds.launch` returns 1 for it); the "
             "Slurm-like and the second hang row run through `python -m rosa_ds.launch`, which returns the ranks' "
             "code. A hung rank under the `deepspeed` runner ends the job after --dist-timeout plus the runner's 30 s "
             "SIGTERM grace; `python -m rosa_ds.launch` kills it 5 s after its peer's exit. "
             "Fault to job end: from the injection to the last "
             "process of the job gone. Steps lost: completed optimizer steps in no checkpoint, recomputed by "
             "`--resume` (`--save-every` bounds them); no data is lost in any row "
             "(the resumed losses equal the uninterrupted run's bit for bit, each step once)."]
    for row in r["rows"]:
        out.append(f"| {row['fault']} | {row.get('exit_code')} | {row.get('fault_to_end_s', '')} | "
                   f"{row.get('newest_checkpoint', '')} | {row.get('steps_lost', '')} | "
                   f"{row.get('bitwise_equal', '')} | {row.get('each_step_once', '')} |")
    out += notes + ["", "The one line each run printed:", ""]
    out += [f"- {row['fault']}: `{row.get('line', '')}`" for row in r["rows"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
