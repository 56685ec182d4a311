"""Real multi-process launches for tests and benchmarks, each with a free port and a hard timeout.

``launch_ranks`` starts N processes of a rank script (gloo on 127.0.0.1) the way DeepSpeed's
launcher does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and returns each rank's
JSON result, so tests compare numbers instead of asserting that it ran. ``launch_cli`` runs
``launch/train.py --output-dir OUT ARGS`` on N ranks: started directly (``launch_direct``) unless
``runner="deepspeed"`` asks for the real ``deepspeed --num_gpus N`` runner (``launch_deepspeed``).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rosa_ds.utils.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 420


def rank_env(rank: int, world_size: int, port: int, local_rank: int | None = None,
             local_world_size: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
        "LOCAL_SIZE": str(world_size if local_world_size is None else local_world_size),
        "LOCAL_WORLD_SIZE": str(world_size if local_world_size is None else local_world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    })
    return env


def _failure_report(failed: str, logs: list) -> RuntimeError:
    outputs = []
    for rank, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- rank {rank} ---\n{log.read()[-6000:]}")
    return RuntimeError(f"multi-rank launch failed: {failed}\n" + "\n".join(outputs))


def launch_ranks(script: str | Path, args: list[str] | None = None, world_size: int = 2,
                 timeout: float = 300, nodes: int = 1, extra_env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> list[Any]:
    """Run ``script`` on ``world_size`` ranks and return each rank's JSON result.

    The script receives ``--result PATH`` and must write its result there as JSON. With
    ``nodes > 1`` ranks are spread over simulated nodes (LOCAL_RANK restarts at 0 on each),
    so code that confuses local and global rank fails. ``extra_env`` is added to every rank's
    environment, ``{rank}`` in a value replaced by the rank (e.g. one NCCL_HOSTID per rank);
    ``prefix`` runs each rank under a wrapper (e.g. ``compute-sanitizer``).
    Raises with every rank's output on a non-zero exit or on timeout (all ranks are killed).
    """
    port = free_port()
    per_node = world_size // nodes
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs, results = [], [], []
        for rank in range(world_size):
            res = Path(tmp) / f"rank{rank}.json"
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            cmd = [*(prefix or []), sys.executable, str(script), *(args or []), "--result", str(res)]
            env = rank_env(rank, world_size, port, local_rank=rank % per_node, local_world_size=per_node)
            env.update({k: v.replace("{rank}", str(rank)) for k, v in (extra_env or {}).items()})
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            logs.append(log)
            results.append(res)
        failed = None
        try:
            for rank, p in enumerate(procs):
                if p.wait(timeout=timeout) != 0 and failed is None:
                    failed = f"rank {rank} exited with {p.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout}s (stacks of the hung ranks below)"
            for p in procs:  # faulthandler prints every thread's Python stack on SIGABRT
                if p.poll() is None:
                    p.send_signal(signal.SIGABRT)
            time.sleep(3)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed:
            raise _failure_report(failed, logs)
        for log in logs:
            log.close()
        return [json.loads(r.read_text()) for r in results]


def launcher_env() -> dict:
    """This environment with one thread per rank, the repo first on the path, the venv's launchers on PATH."""
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run_session(cmd: list[str], env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Run a launcher with a hard timeout, as its own process group (session), as a scheduler's
    job is; raises with its output on failure if ``check``."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    return checked(proc, check)


def checked(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    """``proc``; with ``check``, an AssertionError with its output if it failed."""
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def deepspeed_command(script: str | Path, args: list[str], cache: Path, world: int = 2,
                      extra_env: dict | None = None) -> tuple[list[str], dict]:
    """``deepspeed --num_gpus N SCRIPT ARGS`` (the real launcher) with a free port, one thread per
    rank and ``ROSA_DS_CACHE=cache``: the command line and its environment."""
    env = {**launcher_env(), "ROSA_DS_CACHE": str(cache), **(extra_env or {})}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
           str(script), *args]
    return cmd, env


def launch_deepspeed(script: str | Path, args: list[str], cache: Path, world: int = 2, check: bool = True,
                     timeout: float = CLI_TIMEOUT, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``deepspeed_command`` (``run_session``)."""
    cmd, env = deepspeed_command(script, args, cache, world, extra_env)
    return run_session(cmd, env, timeout, check)


def launch_accelerate(script: str | Path, args: list[str], ds_config: Path, world: int = 2,
                      timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """``accelerate launch --use_deepspeed --deepspeed_config_file DS_CONFIG`` (ZeRO-3 models built
    partitioned: ``--zero3_init_flag true``) of ``script`` on ``world`` CPU ranks, with a hard
    timeout (``run_session``)."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--use_deepspeed", "--deepspeed_config_file",
           str(ds_config), "--zero3_init_flag", "true", "--num_processes", str(world), "--num_machines", "1",
           "--main_process_port", str(free_port()), str(script), *args]
    return run_session(cmd, launcher_env(), timeout)


# DeepSpeed's per-node launcher (deepspeed/launcher/launch.py) polls its ranks once a second; when one
# exits non-zero it sends the others SIGTERM, SIGKILL 30 s later, and exits with that rank's code.
DS_POLL_S, DS_TERM_GRACE_S = 1.0, 30.0


def direct_ranks(script: str | Path, args: list[str], env: dict, world: int = 2) -> list[tuple[list[str], dict]]:
    """Each rank's command line and environment as DeepSpeed's per-node launcher gives them on one
    node: ``python -u SCRIPT --local_rank=R ARGS`` with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
    CROSS_RANK/CROSS_SIZE (node 0 of 1), MASTER_ADDR 127.0.0.1, a free MASTER_PORT and the visible
    devices 0..N-1, on top of ``env`` (and the NVML-based CUDA check that importing DeepSpeed
    turns on in the runner's environment unless set)."""
    node = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": str(world),
            "CUDA_VISIBLE_DEVICES": ",".join(str(r) for r in range(world))}
    return [([sys.executable, "-u", str(script), f"--local_rank={rank}", *args],
             {**node, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(world)]


def wait_ranks(procs: list[subprocess.Popen], timeout: float) -> int:
    """The job's exit code as DeepSpeed's launcher passes it on: 0 once every rank exited 0; else
    the first non-zero code (a rank killed by signal N: 256 - N, as its ``sys.exit(-N)`` gives),
    the other ranks given ``DS_POLL_S`` to exit, then SIGTERM, then SIGKILL ``DS_TERM_GRACE_S``
    later. Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (the caller kills)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = next((code for code in codes if code), None)
        if failed is not None or None not in codes:
            break
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired([p.args for p in procs], timeout)
        time.sleep(0.1)
    if failed is None:
        return 0
    for signum, grace in ((None, DS_POLL_S), (signal.SIGTERM, DS_TERM_GRACE_S), (signal.SIGKILL, 10)):
        if all(p.poll() is not None for p in procs):
            break
        if signum is not None:
            signal_group(procs[0].pid, signum)
        end = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.1)
    return failed & 0xFF


def in_group(pgid: int) -> dict:
    """``Popen`` arguments that start the child in process group ``pgid`` (0: a new one it leads)."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": functools.partial(os.setpgid, 0, pgid)}  # Python 3.10


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # every process of the group is gone
        pass


def launch_direct(script: str | Path, args: list[str], cache: Path, world: int = 2, check: bool = True,
                  timeout: float = CLI_TIMEOUT, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``script`` on ``world`` ranks started here, without the ``deepspeed`` runner: what
    ``launch_deepspeed`` runs, with the ranks' command lines and environments DeepSpeed's launcher
    would give them (``direct_ranks``), its exit code (``wait_ranks``) and the ranks' output
    together in stdout and stderr, as a ``CompletedProcess``.

    Why: the runner imports DeepSpeed, then starts ``python -m deepspeed.launcher.launch``, which
    imports it again, before any rank starts: seconds per launch that test nothing when the test is
    about what the ranks do (a run's metrics, its checkpoints, its one-line errors). Where the
    launcher is the point, tests keep the real one: ``launch_cli(..., runner="deepspeed")`` for
    the documented ``deepspeed --num_gpus 2 launch/train.py`` run (tests/multirank/test_cli.py)
    and the faults the runner takes part in (a SIGTERM to the job's process group, a rank whose
    error the launcher must let reach the terminal); ``cli_command`` with the tests' own process
    handling for signals, killed and hung ranks, the runner killed alone and ``python -m
    rosa_ds.launch`` (tests/multirank/test_faults.py); ``launch_deepspeed`` and
    ``launch_accelerate`` for the Hugging Face Trainer (tests/multirank/test_hf_trainer.py).

    The ranks form one process group, led by rank 0, so that a timeout kills all of them (and
    anything they started); it raises ``subprocess.TimeoutExpired`` with their output then."""
    env = {**launcher_env(), "ROSA_DS_CACHE": str(cache), **(extra_env or {})}
    ranks = direct_ranks(script, args, env, world)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        procs: list[subprocess.Popen] = []
        try:
            for cmd, rank_env in ranks:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=out, stderr=err,
                                              **in_group(procs[0].pid if procs else 0)))
            code = wait_ranks(procs, timeout)
        except subprocess.TimeoutExpired as e:
            e.output, e.stderr = read_back(out), read_back(err)
            raise
        finally:
            if procs:
                signal_group(procs[0].pid, signal.SIGKILL)  # a timeout, or a rank's leftover children
            for p in procs:
                p.wait()
        return checked(subprocess.CompletedProcess(ranks[0][0], code, read_back(out), read_back(err)), check)


def read_back(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")


def cli_command(args: list[str], out: Path, world: int = 2, script: Path = ROOT / "launch" / "train.py",
                extra_env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of a CLI run under the real ``deepspeed`` runner (see
    ``launch_cli``)."""
    return deepspeed_command(script, ["--output-dir", str(out), *args], Path(out).parent / "cache", world, extra_env)


def launch_cli(args: list[str], out: Path, world: int = 2, check: bool = True,
               timeout: float = CLI_TIMEOUT, script: Path = ROOT / "launch" / "train.py",
               extra_env: dict | None = None, runner: str = "direct") -> subprocess.CompletedProcess:
    """``launch/train.py --output-dir OUT ARGS`` (or ``script``) on ``world`` ranks with a free port,
    one thread per rank, a cache beside ``out`` and a hard timeout: the ranks started directly
    (``launch_direct``), or with ``runner="deepspeed"`` by ``deepspeed --num_gpus N``
    (``launch_deepspeed``)."""
    launch = {"direct": launch_direct, "deepspeed": launch_deepspeed}[runner]
    return launch(script, ["--output-dir", str(out), *args], Path(out).parent / "cache", world, check, timeout,
                  extra_env)


def metrics_records(out: Path) -> list[dict]:
    """The JSON records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
