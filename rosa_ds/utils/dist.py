"""Rank and world size, with or without a process group (torch.distributed only, no DeepSpeed)."""
from __future__ import annotations

import logging
import os
import socket
import sys


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size): from the process group once it exists, else from the launcher's
    environment (RANK, WORLD_SIZE), else (0, 1). Never LOCAL_RANK: every node has a local rank 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def global_rank() -> int:
    return rank_and_world()[0]


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK from the launcher; 0 for one process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a one-node process group or a test launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_now(code: int) -> None:
    """End this process with ``code`` once its work is written, skipping interpreter teardown.

    The process group is left first (``rosa_ds.ds.dist.shutdown_distributed``, at the end of a run),
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
