"""Writes of one checkpoint save that fail together: disk full or an I/O error on any rank.

A rank whose write raises must not leave the save: the other ranks would wait for it in the
next collective forever. ``WriteGuard`` records the rank's first failure and skips its later
writes of the save, so the rank still reaches every collective the others reach; at the agreed
points (``WriteGuard.agree``) every rank learns whether any failed, rank 0 removes what the
save wrote, and every rank raises the same ``CheckpointWriteError``.

torch's C++ writer reports a full disk as ``RuntimeError`` ("basic_ios::clear: iostream error",
"unexpected pos"), without an errno: a failure is called "no space left" by its errno where
there is one, otherwise by the free space left on the checkpoint's filesystem.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from ..errors import config_field
from ..utils.manifest import file_digest, listing, share
from ..utils.sizes import format_size
from .agree import CheckpointError
from .dist import all_gather_object, rank_and_world

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_FREE_BYTES = 16 << 20  # an errno-less write failure with less than this free is a full disk


class CheckpointWriteError(CheckpointError):
    """A checkpoint save failed on some rank (disk full, I/O error). The previous checkpoint is
    intact and the partial save removed; the message names the path, the space needed and free.
    ``launch/train.py`` exits with 4."""

    exit_code = 4


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the filesystem holding ``path`` (its nearest existing ancestor)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def error_number(exc: Optional[BaseException]) -> Optional[int]:
    """The errno of ``exc`` or of the exception it was raised from (torch's writer wraps the
    ``OSError`` of a Python file object in a ``RuntimeError``), or None."""
    seen = 0
    while exc is not None and seen < 8:
        if getattr(exc, "errno", None) is not None:
            return exc.errno
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def is_no_space(exc: BaseException, free: Optional[int]) -> bool:
    """By the errno where there is one, else by the free space left (see the module docstring)."""
    code = error_number(exc)
    if code is not None:
        return code in NO_SPACE_ERRNOS
    return free is not None and free < LOW_FREE_BYTES


class WriteGuard:
    """This rank's first write failure of one save (see the module docstring)."""

    def __init__(self, root: Path, kind: str = "checkpoint") -> None:
        self.root = Path(root)
        self.kind = kind  # what is being written: "checkpoint" or "final model" (for the message)
        self.failure: Optional[tuple[str, str, bool]] = None  # (path, reason, no space)

    def run(self, path: Path, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, which writes ``path``; after a failure, nothing."""
        if self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except (OSError, RuntimeError) as exc:  # RuntimeError: torch's writer, see the module docstring
            free = free_bytes(path)
            no_space = is_no_space(exc, free)
            reason = "no space left on device" if no_space else _first_line(exc)
            self.failure = (str(path), reason, no_space)
            return None

    @contextlib.contextmanager
    def around_deepspeed(self, ds_engine):
        """DeepSpeed's checkpoint writes (its checkpoint engine's ``save`` and ``makedirs``) go
        through this guard while the block runs."""
        ckpt_engine, names = ds_engine.checkpoint_engine, ("save", "makedirs")
        own = {n: vars(ckpt_engine)[n] for n in names if n in vars(ckpt_engine)}  # usually none: class methods
        save, makedirs = ckpt_engine.save, ckpt_engine.makedirs
        ckpt_engine.save = lambda state_dict, path, *a, **k: self.run(Path(path), save, state_dict, path, *a, **k)
        ckpt_engine.makedirs = lambda path, *a, **k: self.run(Path(path), makedirs, path, *a, **k)
        try:
            yield
        finally:
            for n in names:
                if n in own:
                    setattr(ckpt_engine, n, own[n])
                else:
                    delattr(ckpt_engine, n)

    def agree(self, target: Path, cleanup: Callable[[], None], needed: Callable[[], tuple[int, str]]) -> None:
        """Collective: if a write failed on any rank, rank 0 runs ``cleanup`` and every rank
        raises the same one-line ``CheckpointWriteError`` about ``target``. ``needed`` gives
        (bytes, what that figure is) for the message."""
        found = all_gather_object((socket.gethostname(), self.failure))
        failed = [(r, host, f) for r, (host, f) in enumerate(found) if f is not None]
        if not failed:
            return
        rank, _ = rank_and_world()
        message = None
        if rank == 0:
            need = needed()  # before the cleanup: it may measure what the save wrote
            try:
                cleanup()
            finally:
                message = _message(target, failed, need, free_bytes(target.parent), self.kind)
        message = all_gather_object(message)[0]
        raise CheckpointWriteError(message)


def _first_line(exc: BaseException) -> str:
    text = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).strip().splitlines()
    return f"I/O error ({text[0][:200] if text else type(exc).__name__})"


def _message(target: Path, failed: list, need: tuple[int, str], free: Optional[int], kind: str = "checkpoint") -> str:
    r, host, (path, reason, no_space) = failed[0]
    others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
    nbytes, what = need
    room = f"it needs about {format_size(nbytes)} ({what})" + (f", {format_size(free)} are free" if free is not None
                                                               else "")
    fix = (f"free space or point {config_field('output_dir')} at a larger disk" if no_space
           else "check the disk and the directory's permissions")
    if kind != "checkpoint":  # the final model: every checkpoint is kept, a resume only exports
        return (f"the {kind} {target} could not be written: {reason} writing {path} on rank {r} ({host}){others}; "
                f"{room}; the partial export was removed and the checkpoints are kept: {fix}, then rerun with "
                f"{config_field('resume')} (it exports without training again)")
    return (f"checkpoint {target} could not be saved: {reason} writing {path} on rank {r} ({host}){others}; "
            f"{room}; the partial save was removed and the previous checkpoint is kept: {fix}, then rerun "
            f"with {config_field('resume')}")


def gather_digests(directory: Path, guard: WriteGuard) -> tuple[dict[str, int], dict[str, str]]:
    """Collective, after every rank wrote into ``directory``: (sizes, sha256) of its files, each
    rank hashing its ``share`` of rank 0's listing. A file a rank cannot see (node-local disks)
    is hashed by rank 0; a failure to read is a write failure of the save."""
    rank, world = rank_and_world()
    sizes = all_gather_object(guard.run(directory, listing, directory) if rank == 0 else None)[0] or {}
    mine = {}
    for name in share(sizes, rank, world):
        if (directory / name).is_file():
            mine[name] = guard.run(directory / name, file_digest, directory / name)
    digests = {k: v for part in all_gather_object(mine) for k, v in part.items() if v is not None}
    if rank == 0:
        for name in sizes.keys() - digests.keys():
            digests[name] = guard.run(directory / name, file_digest, directory / name)
    return sizes, digests
