"""Rank-aware logging: rank 0 speaks, other ranks stay quiet unless asked."""
from __future__ import annotations

import logging

from .dist import global_rank

logger = logging.getLogger("rosa_ds")


def log_rank0(message: str, level: int = logging.INFO) -> None:
    if global_rank() == 0:
        if not logger.handlers and not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="[rosa_ds] %(message)s")
        logger.log(level, message)


def warn_rank0(message: str) -> None:
    log_rank0(message, logging.WARNING)

