"""``python -m rosa_ds.launch`` (console script ``rosa-ds-launch``): the ``deepspeed`` runner, made
safe for a batch scheduler's signals.

    python -m rosa_ds.launch --num_gpus 2 launch/train.py --deepspeed zero2 --output-dir runs/x

It takes exactly the ``deepspeed`` runner's arguments and starts the runner in a session of its
own. Why: on SIGTERM the runner exits at once (it forwards signals only for multi-node pdsh) while
its ranks still finish the optimizer step and save; a scheduler that ends the job step when its
first process exits (Slurm: SIGKILL to whatever is left) then kills the ranks mid-save. Here the
runner never sees the job's SIGTERM/SIGINT: this process forwards each one to every rank (the
children of DeepSpeed's per-node launcher; also to the runner when it started a multi-node tool
such as pdsh, which passes it on to the other nodes) and exits only after the runner and every
process of its session are gone, with the ranks' exit code (75 when they were preempted and saved;
``rosa_ds.recipe.faults``).

Two cases DeepSpeed's launcher gets wrong are corrected here:

- A rank that ends while the others keep running, with no signal forwarded (it died, or failed
  after a peer hung in a collective): DeepSpeed's launcher sends the rest SIGTERM and SIGKILL only
  30 s later, which a hung rank (or one stopping on SIGTERM) uses up. The rest are killed after
  ``PEER_GRACE_S``, enough for the survivors to print their one line.
- A rank killed by signal N reaches the runner as exit status 256 - N (247 for SIGKILL): passed on
  as 1 (a rank lost; its peers printed the line), or as 75 when the signal was the SIGTERM/SIGINT
  forwarded during start-up (the rank was still importing: nothing to save).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

from .utils.procs import cmdline, descendants

EXIT_PREEMPTED = 75  # rosa_ds.recipe.faults.EXIT_PREEMPTED (the recipe is not imported here)
PEER_GRACE_S = 5.0
POLL_S = 0.2
LAUNCHER = "deepspeed.launcher.launch"  # DeepSpeed's per-node launcher: its children are the ranks
FORWARDED = (signal.SIGTERM, signal.SIGINT)
MULTINODE = ("pdsh", "mpirun", "srun", "mpiexec")  # multi-node launchers the runner may start


class Job:
    """The runner's session: its ranks, the signals forwarded to them, a rank lost."""

    def __init__(self, runner: subprocess.Popen) -> None:
        self.runner = runner
        self.signals: list[int] = []  # received, in order; each is delivered to every rank once
        self.delivered: dict[int, int] = {}  # rank pid -> how many of ``signals`` it got
        self.seen: set[int] = set()
        self.lost_at: Optional[float] = None  # when a rank was first seen gone without a signal

    def ranks(self) -> tuple[list[int], bool]:
        """(the ranks on this node, whether the runner starts remote ones through a multi-node tool)."""
        tree = {pid: (parent, cmdline(pid)) for pid, parent in descendants(self.runner.pid).items()}
        ranks = [pid for pid, (parent, cmd) in tree.items()
                 if LAUNCHER in tree.get(parent, (0, ""))[1] and LAUNCHER not in cmd]
        remote = any(cmd.split(" ", 1)[0].rsplit("/", 1)[-1] in MULTINODE for _, cmd in tree.values())
        return ranks, remote

    def on_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)  # delivered by the next ``tick`` (within POLL_S)

    def tick(self) -> None:
        """Deliver pending signals (also to ranks started since), and end a job that lost a rank."""
        ranks, remote = self.ranks()
        if remote and self.runner.poll() is None:  # the runner forwards to the other nodes (pdsh)
            for signum in self.signals[self.delivered.get(0, 0):]:
                self.runner.send_signal(signum)
            self.delivered[0] = len(self.signals)
        for pid in ranks:
            for signum in self.signals[self.delivered.get(pid, 0):]:
                _kill(pid, signum)
            self.delivered[pid] = len(self.signals)
        if self.seen - set(ranks) and ranks and not self.signals:
            self.lost_at = self.lost_at or time.monotonic()
            if time.monotonic() - self.lost_at > PEER_GRACE_S:
                for pid in ranks:
                    _kill(pid, signal.SIGKILL)
        self.seen |= set(ranks)

    def wait(self) -> int:
        """The runner's exit code once its whole session is gone (orphaned ranks still saving)."""
        while self.runner.poll() is None:
            self.tick()
            time.sleep(POLL_S)
        while _group_alive(self.runner.pid):
            self.tick()
            time.sleep(POLL_S)
        return self.exit_code(self.runner.returncode)

    def exit_code(self, code: int) -> int:
        if code < 0:  # the runner itself killed (by something other than this process)
            return 128 - code
        if code > 192:  # 256 - N: a rank killed by signal N (the ranks' own codes are at most 128 + 64)
            signum = 256 - code
            if signum in self.signals:
                print(f"rosa_ds: preempted: stopped ({signal.Signals(signum).name}) during start-up: nothing "
                      "to save, no checkpoint changed; rerun the same command", file=sys.stderr, flush=True)
                return EXIT_PREEMPTED
            return 1
        return code


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runner_command(argv: list[str]) -> list[str]:
    """The ``deepspeed`` runner with ``argv``, by this interpreter (the same environment)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", *argv]


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        parts = __doc__.strip().split("\n\n")
        print("\n\n".join(parts[:3]) + "\n\nThe deepspeed runner's own options follow.\n", flush=True)
        return subprocess.call(runner_command(["--help"]))
    job = None

    def early(signum: int, frame) -> None:  # before the runner starts: nothing to forward yet
        pending.append(signum)

    pending: list[int] = []
    previous = {s: signal.signal(s, early) for s in FORWARDED}
    try:
        job = Job(subprocess.Popen(runner_command(argv), start_new_session=True))
        job.signals += pending
        for s in FORWARDED:
            signal.signal(s, job.on_signal)
        return job.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
