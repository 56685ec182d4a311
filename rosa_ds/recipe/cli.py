"""Command-line entry: a clear one-line error for bad input instead of a deep stack trace."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from ..utils.dist import global_rank

# Errors that describe bad input (the project's own error types subclass ValueError); anything
# else is a bug and keeps its traceback. ROSA_DS_DEBUG=1 keeps the traceback for these too.
USER_ERRORS = (ValueError, FileNotFoundError)
RANK0_GRACE = 20.0  # seconds another rank waits before reporting an error itself (see ``report``)


def main(argv: Optional[list] = None) -> int:
    from .config import parse_args
    from .trainer import Trainer

    try:
        cfg = parse_args(argv)
        Trainer(cfg).run()
    except USER_ERRORS as exc:
        if os.environ.get("ROSA_DS_DEBUG") == "1":
            raise
        report(exc, global_rank())
        return 2
    return 0


def report(exc: Exception, rank: int, grace: float = RANK0_GRACE) -> None:
    """One line per failure: rank 0 prints at once. Another rank first gives rank 0 ``grace``
    seconds, because the launcher kills every rank as soon as one exits non-zero: when rank 0 hits
    the same error (bad input is seen by every rank) its line is printed and this rank is killed
    while it waits; an error only this rank hits is still printed, with its rank."""
    if rank != 0:
        time.sleep(grace)
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"rosa_ds: error{where}: {exc}", file=sys.stderr, flush=True)
