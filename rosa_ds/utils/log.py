"""Rank-aware logging: rank 0 speaks, other ranks speak only about what happened to them alone.

The library only emits records on the ``rosa_ds`` logger (with a ``NullHandler``, as a library
should: configuring handlers is the application's choice). Entry points (the CLI, ``python -m
rosa_ds.memory``, the examples) call ``setup_logging`` once to print ``[rosa_ds] ...`` lines on
stderr; an application that configures logging itself sees the same records through its own
handlers.
"""
from __future__ import annotations

import logging
import sys

from .dist import global_rank

logger = logging.getLogger("rosa_ds")
logger.addHandler(logging.NullHandler())
FORMAT = "[rosa_ds] %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Print the ``rosa_ds`` logger's records on stderr, unless the application already configured
    the root logger (then its handlers print them). Idempotent; the root logger is left alone.

    Each record goes out as one whole line (the stream is flushed per record), so a progress bar
    that redraws with carriage returns cannot glue itself to it when stderr is a file."""
    logger.setLevel(level)
    if logging.getLogger().handlers or any(getattr(h, "_rosa_ds", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._rosa_ds = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def log_rank0(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on global rank 0 only (what every rank would say alike)."""
    if global_rank() == 0:
        logger.log(level, message)


def warn_rank0(message: str) -> None:
    log_rank0(message, logging.WARNING)


def log_this_rank(message: str, level: int = logging.INFO) -> None:
    """Log what only this rank did (e.g. it converted a shared cache entry), naming the rank when
    it is not rank 0."""
    rank = global_rank()
    logger.log(level, message if rank == 0 else f"(rank {rank}) {message}")


# Third-party lines that every rank prints and that say nothing a user can act on: DeepSpeed's
# accelerator guess (rosa_ds says once which accelerator it trains on), its scheduler asking for a
# learning rate before the first step (DeepSpeed's own initialize does), and torch's deprecation of a
# collective DeepSpeed still calls; bitsandbytes' attempt (on CPUs with AVX512-BF16) to fetch a
# faster 4-bit kernel from a hub, which fails offline and leaves its own working CPU kernel in use.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_NOISE = ("Failed to load CPU gemm_4bit_forward from kernels-community",)
DEEPSPEED_NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")
WARNING_NOISE = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_third_party() -> None:
    """Silence the known third-party noise above (idempotent). Installed on the ``DeepSpeed``
    logger by name, so it holds for records DeepSpeed emits while it is first imported."""
    import warnings

    for name, fragments in (("DeepSpeed", DEEPSPEED_NOISE), (BNB_CPU_LOGGER, BNB_NOISE)):
        third = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in third.filters):
            third.addFilter(_DropMessages(fragments))
    for pattern in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
