"""Decisions every rank must take together: a failure on some ranks only would leave the others
waiting in a collective forever."""
from __future__ import annotations

import socket

from ..errors import ConfigError
from .dist import all_gather_object

SHARED_FS = "the checkpoint directory must be one filesystem that every node sees (a shared file system)"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be saved or resumed here; the message says why and what to do."""


def agree(check, what: str, fix: str = SHARED_FS) -> None:
    """Run ``check`` on every rank; if it failed anywhere, raise on every rank. The same failure
    everywhere is raised as is; failures on some ranks name each rank's host and reason, and ``fix``."""
    try:
        check()
        mine = None
    except (OSError, ValueError) as exc:
        mine = str(exc)
    found = all_gather_object((socket.gethostname(), mine))
    failures = [(r, host, msg) for r, (host, msg) in enumerate(found) if msg]
    if not failures:
        return
    if len(failures) == len(found) and len({msg for *_, msg in failures}) == 1:
        raise CheckpointError(failures[0][2])
    shown = "; ".join(f"rank {r} on {host}: {msg}" for r, host, msg in failures[:4])
    raise CheckpointError(f"{what}: {shown}{' ...' if len(failures) > 4 else ''}; {fix}")


def everywhere(value: bool) -> bool:
    """True if ``value`` is True on every rank."""
    return all(all_gather_object(bool(value)))
