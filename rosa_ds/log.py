"""Rank-aware logging: rank 0 speaks, other ranks stay quiet unless asked."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("rosa_ds")


def global_rank() -> int:
    """The global rank (RANK from the launcher, else torch.distributed, else 0). Never LOCAL_RANK:
    on a multi-node run every node has a local rank 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def log_rank0(message: str, level: int = logging.INFO) -> None:
    if global_rank() == 0:
        if not logger.handlers and not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="[rosa_ds] %(message)s")
        logger.log(level, message)


def print0(*args, **kwargs) -> None:
    if global_rank() == 0:
        print(*args, **kwargs, flush=True)
