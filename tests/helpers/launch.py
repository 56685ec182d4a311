"""Real multi-process launches for tests and benchmarks, each with a free port and a hard timeout.

``launch_ranks`` starts N processes of a rank script (gloo on 127.0.0.1) the way DeepSpeed's
launcher does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and returns each rank's
JSON result, so tests compare numbers instead of asserting that it ran. ``launch_cli`` runs
``deepspeed --num_gpus N launch/train.py ...`` itself.
"""
from __future__ import annotations

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


def cli_command(args: list[str], out: Path, world: int = 2, script: Path = ROOT / "launch" / "train.py",
                extra_env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of a CLI run (see ``launch_cli``)."""
    return deepspeed_command(script, ["--output-dir", str(out), *args], Path(out).parent / "cache", world, extra_env)


def launch_cli(args: list[str], out: Path, world: int = 2, check: bool = True,
               timeout: float = CLI_TIMEOUT, script: Path = ROOT / "launch" / "train.py",
               extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N launch/train.py --output-dir OUT ARGS`` (or ``script``) with a free
    port, one thread per rank, a cache beside ``out`` and a hard timeout (``launch_deepspeed``)."""
    return launch_deepspeed(script, ["--output-dir", str(out), *args], Path(out).parent / "cache", world, check,
                            timeout, extra_env)


def metrics_records(out: Path) -> list[dict]:
    """The JSON records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
