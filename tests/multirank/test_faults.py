"""Faults on real CLI runs (2 CPU ranks, a tiny model). A fault the launcher takes part in (a signal
to the job, a killed or hung rank, the runner killed, an error that must reach the terminal) runs
under the real ``deepspeed`` runner or ``python -m rosa_ds.launch``; the checkpoint and resume cases
start their ranks directly (``launch_cli``).

Damaged checkpoints and a full disk: one trained output is shared (``trained``: 14 steps, a
resample at step 7, checkpoints at steps 12 and 14 kept); each case copies it and damages the
copy. The reference for every resumed loss is that uninterrupted run's loss of the same step.

Preemption signals, a vanished runner, a killed rank, non-finite steps, a second run on a live
output dir and an error found first by a non-zero rank: each injected at a chosen step by
``scripts/fault_train.py`` (``launch/train.py`` plus the fault; production code has no hooks).
"""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosa_ds.ds.verify import checkpoint_damage
from rosa_ds.recipe.faults import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_SAVE_FAILED
from tests.helpers.launch import ROOT, cli_command, launch_cli, metrics_records

SHIM = ROOT / "tests" / "helpers" / "enospc"  # sitecustomize: ENOSPC after N bytes under a directory
LOADED = "[rosa_ds] loaded "  # logged once the model's weights are loaded (rosa_ds.recipe.models)
STEP12, STEP14 = "step_00000012", "step_00000014"


@pytest.fixture(scope="module")
def assets(cli_assets):
    return cli_assets


def args(assets):
    return ["--model", str(assets / "llama"), "--dataset", str(assets / "data.jsonl"), "--method", "rosa",
            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--seq-len", "48", "--micro-batch", "4",
            "--epochs", "2", "--lr", "3e-3", "--rank", "4", "--max-eval-samples", "8", "--num-samples", "1",
            "--save-every", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets):
    """The uninterrupted run: 7 steps per epoch, saves at 3, 6, 7, 9, 12, 14; 12 and 14 kept."""
    out = tmp_path_factory.mktemp("faults") / "trained"
    launch_cli(args(assets), out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [STEP12, STEP14]
    return out


def losses(out):
    return {r["step"]: r["loss"] for r in metrics_records(out) if "loss" in r}


def error_line(proc) -> str:
    """The CLI's one line (``rosa_ds: error|preempted|diverged: ...``), not its log lines."""
    text = proc.stderr + proc.stdout
    lines = [line for line in text.splitlines() if "rosa_ds: " in line and "[rosa_ds]" not in line]
    assert lines, text[-3000:]
    line = lines[0][lines[0].index("rosa_ds: "):]
    doubled = re.search(r"\b([a-z]+) \1\b", line)
    assert doubled is None, f"a doubled word ({doubled.group(0)!r}) in: {line}"  # "at at" was once printed
    return line


def rewrite(ckpt, name, data: bytes):
    """Replace one file of a checkpoint and fix its manifest (size and sha256): a consistent file."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"][name], manifest["sha256"][name] = len(data), hashlib.sha256(data).hexdigest()
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))


def damage_newer_copies(ckpts):
    """Newer copies of step 14, each damaged one way, a truncated step 14 and a garbage ``latest``.
    Returns (checkpoint, the file its warning must name) in the order a resume meets them."""
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    copies = {n: ckpts / f"step_{n:08d}" for n in (15, 16, 17, 18)}
    for path in copies.values():
        shutil.copytree(ckpts / STEP14, path)
    data = bytearray((copies[15] / shard).read_bytes())  # same size, a few bytes inverted mid-file
    data[len(data) // 2: len(data) // 2 + 4] = bytes(255 - b for b in data[len(data) // 2: len(data) // 2 + 4])
    (copies[15] / shard).write_bytes(bytes(data))
    (copies[16] / "rosa_state.json").unlink()
    (copies[17] / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    # step 18 names a frozen record whose shard is truncated (the checkpoint's own files are consistent)
    state = json.loads((copies[18] / "rosa_state.json").read_text())
    record = ckpts / "frozen" / state["frozen"]
    broken = record.with_name("broken-0001")
    shutil.copytree(record, broken)
    shard_file = sorted(broken.glob("*.safetensors"))[0]
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    rewrite(copies[18], "rosa_state.json", json.dumps({**state, "frozen": broken.name}).encode())
    model_states = ckpts / STEP14 / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00\x81garbage")
    return [(ckpts / "latest", "latest is not text"),
            (copies[18], f"{broken.name}/{shard_file.name} is truncated (100 of"),
            (copies[17], "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
            (copies[16], "rosa_state.json is missing"), (copies[15], f"{shard} is corrupted"),
            (ckpts / STEP14, "mp_rank_00_model_states.pt is truncated (1000 of")]


def test_damaged_checkpoints_fall_back_then_a_full_disk_stops_cleanly(tmp_path, assets, trained, monkeypatch):
    """One resumed launch: every damaged checkpoint is passed over with a warning naming the file,
    before the weights load; the run continues from step 12 with the uninterrupted run's losses
    bit for bit and metrics.jsonl holds each step once. Its next save then meets a full disk on
    rank 1 (injected ENOSPC after 10 kB): one line naming the path and the space, every rank
    stops, no .partial is left and step 12 is still intact."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("final_model"))
    ckpts = out / "checkpoints"
    expected = damage_newer_copies(ckpts)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("ROSA_DS_TEST_ENOSPC", f"{ckpts}:10000:1")
    proc = launch_cli(args(assets) + ["--resume"], out, check=False)
    log = proc.stderr
    assert proc.returncode == EXIT_SAVE_FAILED, log[-3000:]
    # the fallback: one warning per damaged thing, naming it, in order, all before the weights load
    assert LOADED in log, log[-3000:]
    loaded_at = log.index(LOADED)
    at = 0
    for path, words in expected:
        line = next((ln for ln in log[at:].splitlines() if path.name in ln and words in ln), None)
        assert line is not None, (path, words, [ln for ln in log[:loaded_at].splitlines() if "rosa_ds" in ln])
        at = log.index(line, at)
        assert at < loaded_at
    assert log.index(f"resuming from {ckpts / STEP12}") < loaded_at
    # recomputed steps equal the uninterrupted run's, and each step is in metrics.jsonl once
    recs = metrics_records(out)
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 15)), steps
    assert losses(out) == losses(trained)
    assert [r["step"] for r in recs if r.get("event") == "checkpoint"] == [3, 6, 7, 9, 12]
    # the full disk: one line naming the path and the space; nothing half-written left behind
    line = error_line(proc)
    assert f"checkpoint {ckpts / STEP14} could not be saved: no space left on device writing" in line, line
    assert f"{STEP14}.partial/" in line and "on rank 1" in line and "are free" in line, line
    assert "the size of the previous checkpoint step_00000012" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(ckpts.rglob("*.partial")), list(ckpts.rglob("*.partial"))
    assert checkpoint_damage(ckpts / STEP12) is None


def test_a_damaged_frozen_record_falls_back_to_a_checkpoint_of_the_other_copy_and_is_written_again(
        tmp_path, assets, trained):
    """Steps 12 and 14 (one resample cycle) name the cycle's two copies of its frozen record; 16
    bytes flipped in step 14's: the resume passes 14 over naming the record's file and loads 12;
    the save of step 14 checks that copy's hashes, names it damaged and writes it again, so both
    kept checkpoints end intact and the losses equal the uninterrupted run's bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("final_model"))
    ckpts = out / "checkpoints"
    named = {c: json.loads((ckpts / c / "rosa_state.json").read_text())["frozen"] for c in (STEP12, STEP14)}
    assert named[STEP12] != named[STEP14], named
    shard = sorted((ckpts / "frozen" / named[STEP14]).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(255 - b for b in data[len(data) // 2: len(data) // 2 + 16])
    shard.write_bytes(bytes(data))
    proc = launch_cli(args(assets) + ["--resume"], out)
    log = proc.stderr
    assert f"checkpoint {STEP14} is damaged, falling back to an earlier one: its frozen record: {shard} is " \
           "corrupted" in log, log[-3000:]
    assert log.index(f"resuming from {ckpts / STEP12}") < log.index(LOADED)
    assert f"the frozen record {named[STEP14]} this checkpoint builds on is damaged ({shard} is corrupted" in log
    assert losses(out) == losses(trained)
    assert [checkpoint_damage(ckpts / c) for c in (STEP12, STEP14)] == [None, None]


def test_resume_refuses_a_moved_step_to_sample_mapping_and_records_a_schedule_change(tmp_path, assets, trained,
                                                                                       monkeypatch):
    """--micro-batch 2 --grad-accum 2 (the same global batch of 8, other samples per step on each rank)
    is refused in one line before the weights load, metrics.jsonl untouched; a changed --lr is
    allowed, named in a notice and recorded in metrics.jsonl; stale .partial saves are removed.
    That resumed run (the finished one: it only exports) then meets a full disk on rank 0 after
    10 kB of the export: one line naming the file and the space, exit 4, no traceback, no partial
    export left, the checkpoints kept."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("final_model"))
    before = (out / "metrics.jsonl").read_text()
    proc = launch_cli(args(assets) + ["--resume", "--micro-batch", "2", "--grad-accum", "2"], out, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f"rosa_ds: error: --resume: cannot continue from {out / 'checkpoints' / STEP14}: it was "
                           "saved with --micro-batch 4, this run has --micro-batch 2 (use --micro-batch 4: the same "
                           "step would train other samples); it was saved with --grad-accum 1"), line
    assert LOADED not in proc.stdout + proc.stderr and (out / "metrics.jsonl").read_text() == before
    stale = [out / "checkpoints" / "step_00000015.partial", out / "checkpoints" / "frozen" / "x-0002.partial"]
    for path in stale:  # an interrupted save the resumed run never reaches again
        path.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("ROSA_DS_TEST_ENOSPC", f"{out / '.final_model.tmp'}:10000:0")
    proc = launch_cli(args(assets) + ["--resume", "--lr", "6e-3"], out, check=False)
    assert not any(p.exists() for p in stale)
    assert f"resuming from {out / 'checkpoints' / STEP14} with a changed schedule: --lr 0.003 -> 0.006" in proc.stderr
    changes = [(r["step"], r["changes"]) for r in metrics_records(out) if r.get("event") == "resume_changes"]
    assert changes == [(14, {"lr": {"checkpoint": 3e-3, "now": 6e-3}})]
    # the export's full disk
    assert proc.returncode == EXIT_SAVE_FAILED, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f"rosa_ds: error: the final model {out / 'final_model'} could not be written: no space "
                           f"left on device writing {out}/.final_model.tmp"), line
    assert "on rank 0" in line and "are free" in line and "rerun with --resume" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(out.glob(".final_model*")) and not (out / "final_model").exists()
    assert [checkpoint_damage(out / "checkpoints" / c) for c in (STEP12, STEP14)] == [None, None]


def test_a_new_run_in_a_used_output_dir_is_refused_or_starts_over_with_overwrite(tmp_path, assets, trained):
    """Without --resume, a finished run's directory is refused in one line before the weights load;
    with --overwrite-output-dir the old checkpoints and metrics go first, so the new run's
    checkpoints survive pruning and metrics.jsonl holds only its steps; its final step, also a
    --save-every step, is saved once."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    proc = launch_cli(args(assets) + ["--lr", "1e-3"], out, check=False)
    assert proc.returncode == 2 and LOADED not in proc.stdout + proc.stderr
    assert error_line(proc).startswith(f"rosa_ds: error: --output-dir {out} holds another run (checkpoints, "
                                       "metrics.jsonl, final_model); continue it with --resume, start over with "
                                       "--overwrite-output-dir")
    # one epoch of 7 steps, --save-every 7: the last step is a --save-every step too, saved once
    launch_cli(args(assets) + ["--epochs", "1", "--save-every", "7", "--overwrite-output-dir"], out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000007"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000007"
    assert [r["step"] for r in metrics_records(out) if "loss" in r] == list(range(1, 8))
    assert [r["step"] for r in metrics_records(out) if r.get("event") == "checkpoint"] == [7]


def test_explicit_resume_of_a_damaged_checkpoint_is_one_line_before_weights_load(tmp_path, assets, trained):
    """``--resume PATH`` names one checkpoint: damaged, it is an error naming the file (no fallback)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("final_model"))
    ckpt = out / "checkpoints" / STEP14
    data = bytearray((ckpt / "mp_rank_00_model_states.pt").read_bytes())
    data[-100] ^= 0xFF  # same size
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_text()
    proc = launch_cli(args(assets) + ["--resume", str(ckpt)], out, check=False)
    assert proc.returncode != 0
    line = error_line(proc)
    assert f"--resume {ckpt}: the checkpoint is damaged: {ckpt / 'mp_rank_00_model_states.pt'} is corrupted" in line
    assert LOADED not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before


# --- stopping: signals, a vanished runner, a killed rank, NaN, the lock, errors -----------------

FAULT_SCRIPT = ROOT / "tests" / "multirank" / "scripts" / "fault_train.py"


def fault_args(assets, *extra):
    # 58 training samples, global batch 8: 7 steps per epoch, a resample after step 7
    return ["--model", str(assets / "llama"), "--dataset", str(assets / "data.jsonl"), "--deepspeed", "zero2",
            "--seq-len", "48", "--micro-batch", "4", "--epochs", "2", "--lr", "3e-3", "--rank", "4",
            "--max-eval-samples", "8", "--num-samples", "0", *extra]


def fault_run(assets, out, fault, *extra, rank=0, env=None, check=False, runner="direct"):
    return launch_cli(fault_args(assets, *extra), out, check=check, script=FAULT_SCRIPT, runner=runner,
                      extra_env={"ROSA_FAULT": fault, "ROSA_FAULT_RANK": str(rank), **(env or {})})


@pytest.fixture(scope="module")
def uninterrupted(trained):
    """The reference of every resumed run below: ``trained``, the same training as ``fault_args``
    (the same template, data, seed and steps; its checkpoints every 3 steps and one greedy sample
    per evaluation change no loss), so one launch serves both."""
    return trained


def rosa_launch(cmd: list) -> list:
    """``python -m rosa_ds.launch`` in place of the ``deepspeed`` runner of ``cli_command``."""
    return [sys.executable, "-m", "rosa_ds.launch", *cmd[1:]]


def kill_job(marker: str) -> list:
    """SIGKILL every process whose environment holds ``marker``, as Slurm ends a job step (by its
    cgroup, not by process group or parentage); returns their pids."""
    killed = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


def test_slurm_like_kill_through_rosa_ds_launch_keeps_the_signalled_step(tmp_path, assets, uninterrupted):
    """The job step as Slurm runs it, through ``python -m rosa_ds.launch`` in its own session:
    SIGTERM to the session's process group during step 9, and SIGKILL to every process of the job
    the moment the launcher exits. The launcher exits only after the ranks finished step 9 and
    saved it, with their code 75, so nothing is left to kill; the resumed run equals the
    uninterrupted one bit for bit."""
    out, stamp, release = tmp_path / "run", tmp_path / "held", tmp_path / "release"
    cmd, env = cli_command(fault_args(assets), out, script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "hold@9", "ROSA_FAULT_RELEASE": str(release),
                                      "ROSA_FAULT_STAMP": str(stamp)})
    marker = f"ROSA_FAULT_STAMP={stamp}"
    job = subprocess.Popen(rosa_launch(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not stamp.exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGTERM)  # the launcher's own group: the ranks are in the runner's session
        time.sleep(1.0)  # forwarded within 0.2 s; step 9 then runs with the stop requested
        release.write_text("go")
        stdout, stderr = job.communicate(timeout=300)
    finally:
        left = kill_job(marker)
    assert job.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert left == [], left
    line = error_line(subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr))
    assert line.startswith("rosa_ds: preempted: stopped (SIGTERM) after step 9"), line
    assert (out / "checkpoints" / "latest").read_text() == "step_00000009"
    assert not list((out / "checkpoints").rglob("*.partial"))
    launch_cli(fault_args(assets, "--resume"), out)
    assert [r["step"] for r in metrics_records(out) if "loss" in r] == list(range(1, 15))
    assert losses(out) == losses(uninterrupted)  # bit for bit (fp32 on the CPU)


def test_sigterm_to_the_job_saves_the_current_step_and_resume_loses_nothing(tmp_path, assets, uninterrupted):
    """SIGTERM to the job's process group during step 9 (after the resample at step 7): every
    rank finishes step 9, one checkpoint at step 9, ranks exit 75; the resumed run's losses equal
    an uninterrupted run's bit for bit, each step recorded once."""
    full = uninterrupted
    out = tmp_path / "preempted"
    proc = fault_run(assets, out, "sigterm@9", runner="deepspeed")  # the runner and launcher get it too
    assert "rosa_ds: preempted: stopped (SIGTERM) after step 9" in error_line(proc)
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000009"  # the epoch's end (7), then 9
    recs = metrics_records(out)
    assert recs[-1]["event"] == "preempted" and recs[-1]["step"] == 9
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 10))
    launch_cli(fault_args(assets, "--resume"), out)
    steps = [r["step"] for r in metrics_records(out) if "loss" in r]
    assert steps == list(range(1, 15))  # none lost, none twice
    assert losses(out) == losses(full)  # bit for bit (fp32 on the CPU)
    assert not (out / ".rosa_ds.lock").exists()


def test_a_rank_killed_with_sigkill_ends_the_job_within_seconds_with_one_line(tmp_path, assets):
    stamp = tmp_path / "killed_at"
    cmd, env = cli_command(fault_args(assets), tmp_path / "run", script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "sigkill@4", "ROSA_FAULT_RANK": "1",
                                      "ROSA_FAULT_STAMP": str(stamp)})
    proc = subprocess.run(rosa_launch(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    ended = time.time()
    assert proc.returncode == 1  # the README's fault table (DeepSpeed's launcher passes on 247: -9)
    # The survivor learns of the death at its next collective, at most one step away: 10 s beyond
    # two of the run's own steps (a loaded machine's steps are slower; a fixed 10 s once failed at
    # 83 s under load). The 30-minute --dist-timeout is what this bound tells the death apart from.
    step = max(r["step_seconds"] for r in metrics_records(tmp_path / "run") if "step_seconds" in r)
    took = ended - float(stamp.read_text().split()[1])
    assert took <= 10 + 2 * step, (took, step)
    assert error_line(proc).startswith("rosa_ds: error: another rank died"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_hung_rank_ends_the_job_within_the_dist_timeout_and_seconds(tmp_path, assets):
    """Rank 1 hangs in step 3 with --dist-timeout 0.1 (6 s): rank 0's collective times out and it
    exits with one line; ``rosa_ds.launch`` kills the hung rank ``PEER_GRACE_S`` later (DeepSpeed's
    launcher alone would wait 30 s after its SIGTERM, which the hung rank does not act on)."""
    from rosa_ds.launch import PEER_GRACE_S

    stamp = tmp_path / "hung_at"
    cmd, env = cli_command(fault_args(assets, "--dist-timeout", "0.1"), tmp_path / "run", script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "hang@3", "ROSA_FAULT_RANK": "1", "ROSA_FAULT_STAMP": str(stamp)})
    proc = subprocess.run(rosa_launch(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    took = time.time() - float(stamp.read_text().split()[1])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 6 <= took <= 6 + PEER_GRACE_S + 10, took  # the rest: polling and start-up noise on a loaded machine
    assert "a collective waited longer than --dist-timeout" in error_line(proc)


def test_sigterm_during_start_up_stops_at_once_with_nothing_to_save(tmp_path, assets):
    """SIGTERM to the job once rank 0 holds the output-dir lock (its input checks, before the
    weights load): every rank stops at once, exit 75, one line saying there was nothing to save."""
    out = tmp_path / "run"
    cmd, env = cli_command(fault_args(assets), out)
    job = subprocess.Popen(rosa_launch(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (out / ".rosa_ds.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)
    signalled = time.time()
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert time.time() - signalled < 15
    line = error_line(subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr))
    assert line.startswith("rosa_ds: preempted: stopped (SIGTERM) during start-up, before the first optimizer "
                           "step: nothing to save"), line
    assert LOADED not in stdout + stderr and not (out / "checkpoints").exists()
    assert not (out / ".rosa_ds.lock").exists()


def test_a_busy_master_port_is_one_line_and_the_job_ends_within_seconds(tmp_path, assets):
    """Another process listens on the launcher's --master_port: rank 0 cannot host the rendezvous
    and says so in one line naming the port; the job (through ``rosa_ds.launch``) ends with exit 2
    instead of rank 1 waiting on the other listener."""
    import socket

    cmd, env = cli_command(fault_args(assets), tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cmd[cmd.index("--master_port") + 1] = str(port)
        start = time.time()
        proc = subprocess.run(rosa_launch(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                              start_new_session=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc).startswith(f"rosa_ds: error: the rendezvous port {port} (--master_port of the launcher) "
                                       "is in use on "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and time.time() - start < 120


def test_ranks_stop_with_a_checkpoint_when_the_deepspeed_runner_alone_is_killed(tmp_path, assets):
    """SIGTERM to the runner only: it dies at once, the launcher and ranks are orphaned; the ranks
    notice within a second, checkpoint after their current step and exit (the launcher follows).
    Rank 0 holds before step 4 until the runner has been gone for longer than the ranks' poll: the
    whole run takes about as long as one poll here, so without the hold it could finish first."""
    out, release = tmp_path / "run", tmp_path / "release"
    cmd, env = cli_command(fault_args(assets, "--epochs", "6"), out, script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "runner@3,hold@4", "ROSA_FAULT_RANK": "0",
                                      "ROSA_FAULT_RELEASE": str(release)})
    runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    runner.wait(timeout=300)
    time.sleep(3.0)  # the ranks' watch polls once a second
    release.touch()
    deadline = time.time() + 120
    while time.time() < deadline:  # the orphans: wait until the whole session is gone
        try:
            os.killpg(runner.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(runner.pid, 9)
        pytest.fail("the orphaned ranks kept running")
    recs = metrics_records(out)
    stop = recs[-1]
    assert stop["event"] == "preempted" and stop["reason"] == "the deepspeed runner is gone", stop
    assert stop["step"] in (3, 4)  # after the step it was in when it noticed (4 unless a poll fell in step 3)
    assert Path(stop["checkpoint"]).name == f"step_{stop['step']:08d}"
    assert not (out / "final_model").exists()


def test_nan_loss_with_policy_skip_drops_the_step_on_every_rank(tmp_path, assets):
    out = tmp_path / "run"
    fault_run(assets, out, "nan@5", "--nan-policy", "skip", rank=1, check=True)
    recs = metrics_records(out)
    step5 = [r for r in recs if r.get("step") == 5 and "loss" in r]
    assert step5 == [{**step5[0], "loss": None, "skipped": True, "skipped_total": 1}]
    others = [r["loss"] for r in recs if "loss" in r and r["step"] != 5]
    assert len(others) == 13 and all(math.isfinite(x) for x in others)
    from safetensors.torch import load_file

    weights = load_file(str(out / "final_model" / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_second_run_on_a_live_dir_is_refused_and_nan_stop_keeps_the_last_good_checkpoint(tmp_path, assets):
    """One launch, two faults: it holds before step 1 while a second run on its --output-dir is
    refused (one line, exit 2); released, it meets a NaN loss at step 5 under --nan-policy stop:
    exit 3 naming the step and the last good checkpoint (step 4), nothing saved after it."""
    out, release = tmp_path / "run", tmp_path / "release"
    cmd, env = cli_command(fault_args(assets, "--save-every", "2"), out, script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "hold@1,nan@5", "ROSA_FAULT_RELEASE": str(release)})
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / ".rosa_ds.lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        holder = json.loads((out / ".rosa_ds.lock").read_text())
        second = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--output-dir", str(out),
                                 *fault_args(assets)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert error_line(second).startswith(f"rosa_ds: error: --output-dir {out} is in use by another run "
                                             f"(host {holder['host']}, pid {holder['pid']}")
    finally:
        release.write_text("go")
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == EXIT_DIVERGED, stderr[-3000:]  # the launcher passes a rank's code on
    line = error_line(subprocess.CompletedProcess(cmd, first.returncode, stdout, stderr))
    assert line.startswith("rosa_ds: diverged: non-finite loss at step 5 (--nan-policy stop)"), line
    assert "the last good checkpoint is" in line and line.split("checkpoint is ")[1].startswith(str(out))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # valid JSON for strict readers
    recs = metrics_records(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5]  # one run's records
    assert recs[-1]["loss"] is None and not (out / "final_model").exists()
    assert not (out / ".rosa_ds.lock").exists()


def test_an_error_found_first_by_rank_1_still_reaches_the_terminal(tmp_path, assets):
    """Rank 1 finds the error at once, rank 0 three seconds later: the launcher kills every rank
    when the first exits, so rank 1 waits for rank 0 to print (and is killed meanwhile)."""
    proc = fault_run(assets, tmp_path / "run", "error@0", rank=1, env={"ROSA_FAULT_DELAY": "3"}, runner="deepspeed")
    assert proc.returncode != 0
    assert error_line(proc) == "rosa_ds: error: --dataset has a record the run cannot use (an injected error)"
    assert "Traceback" not in proc.stderr
