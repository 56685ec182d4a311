"""Command-line entry: a clear one-line error for bad input instead of a deep stack trace."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from .log import global_rank

# Errors that describe bad input (the project's own error types subclass ValueError); anything
# else is a bug and keeps its traceback. ROSA_DS_DEBUG=1 keeps the traceback for these too.
USER_ERRORS = (ValueError, FileNotFoundError)


def main(argv: Optional[list] = None) -> int:
    from .checkpoint import CheckpointError
    from .train_config import parse_args
    from .trainer import Trainer

    try:
        cfg = parse_args(argv)
        Trainer(cfg).run()
    except (*USER_ERRORS, CheckpointError) as exc:
        if os.environ.get("ROSA_DS_DEBUG") == "1":
            raise
        if global_rank() == 0:
            print(f"rosa_ds: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def exit_now(code: int) -> None:
    """End this process with ``code`` once its work is written, skipping interpreter teardown.

    The process group is left first (``rosa_ds.zero.shutdown_distributed``, at the end of a run),
    but DeepSpeed keeps Python references to its gloo groups, whose C++ worker threads are then
    destroyed during interpreter finalization; that intermittently aborts a finished rank
    ("terminate called without an active exception", exit -6), failing a completed launch.
    Everything the run writes is closed by then (checkpoints, final model, metrics; DeepSpeed's
    TensorBoard monitor flushes each write); stdio and logging are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
