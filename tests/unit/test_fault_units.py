"""Output-dir ownership without launches: a used directory refused or cleared, the per-task
default directory, and the output-dir lock under simultaneous attempts."""
import json
import multiprocessing
import os
import socket
import time

import pytest

from rosa_ds.recipe.config import TrainConfig
from rosa_ds.recipe.faults import RUN_OUTPUTS, claim_output_dir


def used_dir(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step_00000512").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 512}\n')
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file")
    return out


def test_a_used_output_dir_is_refused_in_one_line_unless_resumed_or_overwritten(tmp_path):
    out = used_dir(tmp_path)
    with pytest.raises(ValueError) as err:
        claim_output_dir(out, resume=False, overwrite=False, rank=0)
    assert str(err.value) == (f"--output-dir {out} holds another run (checkpoints, metrics.jsonl); continue it with "
                              "--resume, start over with --overwrite-output-dir (deletes that run's checkpoints, "
                              "metrics and final model first), or choose another --output-dir")
    claim_output_dir(out, resume=True, overwrite=False, rank=0)  # resuming it: nothing touched
    claim_output_dir(out, resume=False, overwrite=True, rank=1)  # only rank 0 deletes
    assert (out / "checkpoints").exists()
    claim_output_dir(out, resume=False, overwrite=True, rank=0)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # what a run writes, nothing else
    assert "notes.txt" not in RUN_OUTPUTS
    claim_output_dir(tmp_path / "fresh", resume=False, overwrite=False, rank=0)  # unused: fine


def test_each_task_has_its_own_default_output_dir():
    assert TrainConfig.from_flat({}).output_dir == "runs/default"
    assert TrainConfig.from_flat({"task": "classification"}).output_dir == "runs/default-cls"
    given = TrainConfig.from_flat({"task": "classification", "output_dir": "x"}, explicit={"output_dir"})
    assert given.output_dir == "x"
    with pytest.raises(ValueError, match="--overwrite-output-dir deletes the checkpoints --resume"):
        TrainConfig.from_flat({"overwrite_output_dir": True, "resume": "latest"})


def _attempt(directory, start, results, done):
    """One starting run: wait for the common start, try the lock, report, hold until told."""
    from rosa_ds.recipe.faults import OutputLock

    lock = OutputLock(directory)
    dump, dumps = json.dump, json.dumps  # a slow writer: 50 ms to write the holder's JSON, as on a
    json.dump = lambda *a, **k: (time.sleep(0.05), dump(*a, **k))[1]  # loaded machine or a slow
    json.dumps = lambda *a, **k: (time.sleep(0.05), dumps(*a, **k))[1]  # network filesystem
    start.wait()
    try:
        lock.acquire()
        results.put("held")
    except ValueError as exc:
        results.put(str(exc).split(" (")[0])
    done.wait()
    os._exit(0)


def test_simultaneous_lock_attempts_admit_exactly_one(tmp_path):
    """300 processes (forked, so each has its own pid and start time) try the lock at once, with a
    dead holder's lock in place: they race for its takeover, then for the lock itself; the winner
    holds it while the others decide. Each takes 50 ms to write its JSON: a lock created before
    its content is written would be read empty and taken over meanwhile. Exactly one holds it,
    every other one is refused as 'in use'."""
    ctx = multiprocessing.get_context("fork")
    n = 300
    dead = ctx.Process(target=os._exit, args=(0,))  # a dead holder: a process of this host that has exited
    dead.start()
    dead.join()
    (tmp_path / ".rosa_ds.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                        "start": 1, "since": "then"}))
    start, done, results = ctx.Barrier(n), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_attempt, args=(tmp_path, start, results, done)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(n)]
    finally:
        done.set()
        for p in procs:
            p.join(timeout=30)
    assert outcomes.count("held") == 1, sorted(set(outcomes))
    assert outcomes.count(f"--output-dir {tmp_path} is in use by another run") == n - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rosa_ds.lock"]  # no temporary file or marker left


def test_rosa_ds_launch_passes_on_the_ranks_codes_as_documented(capsys):
    """DeepSpeed's launcher passes a rank killed by signal N on as 256 - N: a lost rank is 1, a rank
    stopped by the forwarded SIGTERM before its handler existed is a start-up preemption (75)."""
    import signal

    from rosa_ds.launch import Job

    job = Job.__new__(Job)
    job.signals = []
    assert [job.exit_code(c) for c in (0, 1, 2, 3, 4, 75, 143)] == [0, 1, 2, 3, 4, 75, 143]
    assert job.exit_code(256 - signal.SIGKILL) == 1  # 247: the OOM killer's SIGKILL
    assert job.exit_code(-signal.SIGTERM) == 128 + signal.SIGTERM  # the runner itself killed
    job.signals = [signal.SIGTERM]
    assert job.exit_code(256 - signal.SIGTERM) == 75
    assert "nothing to save" in capsys.readouterr().err
