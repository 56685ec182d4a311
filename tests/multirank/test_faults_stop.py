"""Faults on real launches (the ``deepspeed`` launcher, 2 CPU ranks, a tiny model): preemption
signals, a vanished runner, a killed rank, non-finite steps, a second run on a live output dir,
and an error found first by a non-zero rank. Each fault is injected at a chosen step by
``scripts/fault_train.py`` (``launch/train.py`` plus the fault; production code has no hooks)."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosa_ds.recipe.faults import EXIT_DIVERGED
from tests.helpers.launch import ROOT, cli_command, launch_cli, metrics_records

FAULT_SCRIPT = ROOT / "tests" / "multirank" / "scripts" / "fault_train.py"


@pytest.fixture
def assets(cli_assets):
    return cli_assets


def args(assets, *extra):
    # 58 training samples, global batch 8: 7 steps per epoch, a resample after step 7
    return ["--model", str(assets / "llama"), "--dataset", str(assets / "data.jsonl"), "--deepspeed", "zero2",
            "--seq-len", "48", "--micro-batch", "4", "--epochs", "2", "--lr", "3e-3", "--rank", "4",
            "--max-eval-samples", "8", "--num-samples", "0", *extra]


def fault_run(assets, out, fault, *extra, rank=0, env=None, check=False):
    return launch_cli(args(assets, *extra), out, check=check, script=FAULT_SCRIPT,
                      extra_env={"ROSA_FAULT": fault, "ROSA_FAULT_RANK": str(rank), **(env or {})})


def losses(out):
    return {r["step"]: r["loss"] for r in metrics_records(out) if "loss" in r}


def error_line(proc) -> str:
    text = proc.stderr + proc.stdout
    lines = [line for line in text.splitlines() if "rosa_ds: " in line and "[rosa_ds]" not in line]
    assert lines, text[-3000:]
    return lines[0][lines[0].index("rosa_ds: "):]


def test_sigterm_to_the_job_saves_the_current_step_and_resume_loses_nothing(tmp_path, assets):
    """SIGTERM to the job's process group during step 9 (after the resample at step 7): every
    rank finishes step 9, one checkpoint at step 9, ranks exit 75; the resumed run's losses equal
    an uninterrupted run's bit for bit, each step recorded once."""
    full = tmp_path / "full"
    launch_cli(args(assets), full)
    out = tmp_path / "preempted"
    proc = fault_run(assets, out, "sigterm@9")
    assert "rosa_ds: preempted: stopped (SIGTERM) after step 9" in error_line(proc)
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000009"  # the epoch's end (7), then 9
    recs = metrics_records(out)
    assert recs[-1]["event"] == "preempted" and recs[-1]["step"] == 9
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 10))
    launch_cli(args(assets, "--resume"), out)
    steps = [r["step"] for r in metrics_records(out) if "loss" in r]
    assert steps == list(range(1, 15))  # none lost, none twice
    assert losses(out) == losses(full)  # bit for bit (fp32 on the CPU)
    assert not (out / ".rosa_ds.lock").exists()


def test_a_rank_killed_with_sigkill_ends_the_job_within_seconds_with_one_line(tmp_path, assets):
    stamp = tmp_path / "killed_at"
    cmd, env = cli_command(args(assets), tmp_path / "run", script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "sigkill@4", "ROSA_FAULT_RANK": "1",
                                      "ROSA_FAULT_STAMP": str(stamp)})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    ended = time.time()
    assert proc.returncode != 0
    assert ended - float(stamp.read_text()) <= 10
    assert error_line(proc).startswith("rosa_ds: error: another rank died"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_ranks_stop_with_a_checkpoint_when_the_deepspeed_runner_alone_is_killed(tmp_path, assets):
    """SIGTERM to the runner only: it dies at once, the launcher and ranks are orphaned; the ranks
    notice within a second, checkpoint after their current step and exit (the launcher follows)."""
    out = tmp_path / "run"
    cmd, env = cli_command(args(assets, "--epochs", "6"), out, script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "runner@3", "ROSA_FAULT_RANK": "0"})
    runner = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    runner.wait(timeout=300)
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
    assert 3 <= stop["step"] < 42  # stopped early, after the step it was in
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
    cmd, env = cli_command(args(assets, "--save-every", "2"), out, script=FAULT_SCRIPT,
                           extra_env={"ROSA_FAULT": "hold@1,nan@5", "ROSA_FAULT_STAMP": str(release)})
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / ".rosa_ds.lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        holder = json.loads((out / ".rosa_ds.lock").read_text())
        second = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--output-dir", str(out),
                                 *args(assets)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
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
    proc = fault_run(assets, tmp_path / "run", "error@0", rank=1, env={"ROSA_FAULT_DELAY": "3"})
    assert proc.returncode != 0
    assert error_line(proc) == "rosa_ds: error: --dataset has a record the run cannot use (an injected error)"
    assert "Traceback" not in proc.stderr
