"""Stopping safely: preemption signals, a vanished launcher, non-finite steps, one run per directory.

Exit codes of a rank (``launch/train.py``; docs/faults.md, "Faults and preemption"):

    0   finished                      2   bad input (one line)
    1   a bug (traceback)             3   diverged: non-finite loss or gradients, or a non-finite export
    4   a checkpoint could not be written (disk full, I/O error); the previous one is intact
    75  preempted: SIGTERM/SIGINT (or the launcher vanished), the current step finished and a
        checkpoint saved; resume with ``--resume`` (75 is sysexits' EX_TEMPFAIL: "try again")
    128+N  a second signal N: exit at once, nothing saved

Once training runs, a signal only sets a flag. The trainer reads it at optimizer-step boundaries
and all ranks agree on it in the step's existing all-reduce, so every rank stops after the same
step: never inside a gradient accumulation or a resample. Before the first optimizer step there
is nothing to save, and a signal stops at once (75). ``python -m rosa_ds.launch`` keeps the
``deepspeed`` runner out of the job's signals so that a scheduler waits for the save.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, RosaError
from ..utils.log import log_rank0
from ..utils.procs import cmdline, parent_of, start_time

EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 4
EXIT_PREEMPTED = 75
# The launcher forwards the signal it got to every rank, so with a signal to the process group
# each rank receives it twice within milliseconds: one request, not a second one.
SAME_REQUEST_S = 2.0


class Preempted(RosaError):
    """Training stopped on request after a checkpoint; ``launch/train.py`` exits with 75."""

    exit_code = EXIT_PREEMPTED


class Diverged(RosaError):
    """Non-finite training state; nothing non-finite was saved. Exit code 3."""

    exit_code = EXIT_DIVERGED


def startup_stop(reason: str) -> Preempted:
    return Preempted(f"stopped ({reason}) during start-up, before the first optimizer step: nothing to save, "
                     "no checkpoint changed; rerun the same command")


class StopRequest:
    """SIGTERM / SIGINT (and a vanished launcher) as a flag read at step boundaries; a second
    signal, ``SAME_REQUEST_S`` or more after the first, exits at once with 128 + its number."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.first = 0.0
        self.saved = False  # a checkpoint of the stop is written: a late signal then exits 75
        self.training = False  # before the first optimizer step a signal stops at once (nothing to save)
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def install(self) -> StopRequest:
        if self._previous:
            return self  # installed already (by the CLI, before its heavy imports)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        watch_launcher(self)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason, self.first = reason, time.monotonic()
            log_rank0(f"{reason}: stopping after the current optimizer step with a checkpoint "
                      "(a second signal exits at once)")

    def begin_training(self) -> None:
        """From here on a signal stops after the current optimizer step, with a checkpoint; a stop
        requested during start-up (by the launcher watch) stops now."""
        if self.reason is not None:
            raise startup_stop(self.reason)
        self.training = True

    def _on_signal(self, signum: int, frame) -> None:
        if self.reason is None and not self.training:
            # Start-up (checks, loading weights, the first evaluation) has nothing to save: stopping
            # at once keeps a large model's load from outlasting the scheduler's grace period.
            self.reason, self.first = signal.Signals(signum).name, time.monotonic()
            raise startup_stop(self.reason)
        if self.reason is None:
            self.request(signal.Signals(signum).name)
        elif time.monotonic() - self.first >= SAME_REQUEST_S:
            os._exit(EXIT_PREEMPTED if self.saved else 128 + signum)


def watch_launcher(stop: StopRequest, every: float = 1.0) -> Optional[threading.Thread]:
    """Under DeepSpeed's launcher (runner -> launcher -> ranks), request a stop when the launcher
    or the runner above it is gone. SIGTERM to the ``deepspeed`` runner alone kills it and
    nothing else (it forwards signals only for multi-node pdsh), leaving the launcher and ranks
    training unattended; a rank sees that as its parent's parent changing (re-parented)."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in cmdline(parent):
        return None
    grand = parent_of(parent)

    def loop() -> None:
        while not stop.requested:
            time.sleep(every)
            if os.getppid() != parent:
                stop.request("the DeepSpeed launcher is gone")
            elif parent_of(parent) != grand:
                stop.request("the deepspeed runner is gone")

    thread = threading.Thread(target=loop, name="rosa_ds-launcher-watch", daemon=True)
    thread.start()
    return thread


class OutputLock:
    """One run per output directory: ``<dir>/.rosa_ds.lock`` holds the holder's host, pid and
    process start time (so a reused pid is not mistaken for the holder). A lock whose holder is
    dead on this host is taken over; a live one (or one held from another host, which cannot be
    checked: remove the file by hand once that run is gone) refuses the run.

    Atomic: the content is written to a file of this process's own first and hard-linked to the
    lock's name, which fails if the name exists, so a reader never sees a half-written lock. A
    takeover removes the dead holder's lock only under ``<lock>.takeover`` (created exclusively)
    and only if the lock still holds what was judged dead, so a live lock taken meanwhile by
    another starting run is never removed."""

    NAME = ".rosa_ds.lock"
    WAIT_S = 10.0  # how long simultaneous starts may keep racing for a dead holder's lock
    STALE_TAKEOVER_S = 30.0  # a takeover marker older than this was left by a process that died in it

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / self.NAME
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        mine = self.path.with_name(f"{self.NAME}.{me['host']}.{me['pid']}")
        mine.write_text(json.dumps(me))
        try:
            deadline = time.monotonic() + self.WAIT_S
            while time.monotonic() < deadline:
                try:
                    os.link(mine, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    pass
                seen = self._read()
                holder = _parse(seen)
                if holder is not None and all(holder.get(k) == me[k] for k in ("host", "pid", "start")):
                    self.held = True  # this process took it already (``trainer.run`` called twice in one process)
                    return
                if holder is not None and self._alive(holder):
                    raise ConfigError(self._in_use(holder, me["host"]))
                self._take_over(seen)
        finally:
            mine.unlink(missing_ok=True)
        raise ConfigError(f"could not lock --output-dir {self.path.parent}: another run keeps taking it")

    def _in_use(self, holder: dict, host: str) -> str:
        where = f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
        extra = "" if holder.get("host") == host else f"; if that run is gone, delete {self.path}"
        return (f"--output-dir {self.path.parent} is in use by another run ({where}); wait for it to finish or "
                f"choose another --output-dir{extra}")

    def _take_over(self, seen: Optional[bytes]) -> None:
        """Remove the lock if it still holds ``seen`` (a dead holder's), one process at a time."""
        marker = self.path.with_name(self.NAME + ".takeover")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - marker.stat().st_mtime > self.STALE_TAKEOVER_S:
                    marker.unlink(missing_ok=True)
            except OSError:
                pass
            time.sleep(0.01)
            return
        try:
            if seen is not None and self._read() == seen:
                log_rank0(f"taking over {self.path}: its holder ({_parse(seen)}) is no longer running")
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            marker.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _read(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True
        pid = holder.get("pid")
        return isinstance(pid, int) and start_time(pid) is not None and start_time(pid) == holder.get("start")


def _parse(content: Optional[bytes]) -> Optional[dict]:
    """A lock's holder, or None (no lock, or garbage: a lock of an older rosa_ds whose holder died
    between creating and filling it)."""
    try:
        holder = json.loads(content) if content is not None else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


# What a run writes into its --output-dir; the first three mark the directory as used.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "final_model", "config.json", "eval_predictions.jsonl",
               "memory_report.json", "memory_report.md", "tb")
USED_BY = RUN_OUTPUTS[:3]


def claim_output_dir(out: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """A new run never mixes with another's outputs: a used --output-dir (checkpoints, metrics or a
    final model in it) is refused unless the run resumes it, or starts over with
    --overwrite-output-dir, which first deletes what a run writes there (rank 0) and nothing else.
    Without this, the old run's higher step numbers survive pruning and the new checkpoints go."""
    used = [name for name in USED_BY if (out / name).exists()]
    if not used or resume:
        return
    if not overwrite:
        raise ConfigError(f"--output-dir {out} holds another run ({', '.join(used)}); continue it with --resume, "
                          "start over with --overwrite-output-dir (deletes that run's checkpoints, metrics and final "
                          "model first), or choose another --output-dir")
    if rank == 0:
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        log_rank0(f"--overwrite-output-dir: removed the previous run's {', '.join(used)} from {out}")
