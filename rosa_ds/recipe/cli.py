"""Command-line entry: a clear one-line error for bad input instead of a deep stack trace."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from ..errors import RosaError, field_words
from ..utils.dist import global_rank
from ..utils.log import log_rank0, setup_logging
from .faults import Diverged, Preempted, StopRequest
from .words import flag_words

# The project's own errors (``rosa_ds.errors.RosaError``) are one line and their exit code;
# anything else is a bug and keeps its traceback. ROSA_DS_DEBUG=1 keeps the traceback for these too.
RANK0_GRACE = 20.0  # seconds another rank waits before reporting an error itself (see ``report``)


def main(argv: Optional[list] = None) -> int:
    """Run the recipe; errors name settings by their flags (``words.flag_words``) while it runs."""
    with field_words(flag_words):
        return _main(argv)


def _main(argv: Optional[list]) -> int:
    setup_logging()
    stop = StopRequest().install()  # before the heavy imports: a SIGTERM during them is a start-up stop
    try:
        from ..ds.write_guard import CheckpointWriteError
        from .config import parse_args
        from .trainer import run

        quiet_progress_bars()  # imports transformers: still start-up
    except Preempted as exc:
        if global_rank() == 0:
            print(f"rosa_ds: preempted: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    try:
        try:
            cfg = parse_args(argv)
            log_rank0(f"accelerator: {accelerator_name()}")
            run(cfg, stop)
        finally:
            stop.uninstall()  # reporting an error: a signal (the launcher ending the job) ends it as usual
    except (Preempted, Diverged, CheckpointWriteError) as exc:  # agreed by every rank: rank 0 says it
        if global_rank() == 0:
            kind = "preempted" if isinstance(exc, Preempted) else "diverged" if isinstance(exc, Diverged) else "error"
            print(f"rosa_ds: {kind}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except RosaError as exc:
        if os.environ.get("ROSA_DS_DEBUG") == "1":
            raise
        report(exc, global_rank())
        return exc.exit_code
    except RuntimeError as exc:
        why = collective_failure(exc)
        if why is None:
            raise
        report(RuntimeError(f"{why}; the last checkpoint is intact: continue with --resume "
                            f"({' '.join(str(exc).split())[:160]})"), global_rank(), grace=0.0)
        return 1
    return 0


def accelerator_name() -> str:
    """What the ranks train on, said once (DeepSpeed's own guess is silenced on every rank)."""
    import torch

    if torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible per process)"
    return "CPU (DeepSpeed's CPU accelerator; no CUDA device found)"


def quiet_progress_bars() -> None:
    """transformers' and huggingface_hub's own bars (loading weights, writing shards) only where a
    person watches: on rank 0 with a terminal. Elsewhere each redraw would become a log line."""
    if global_rank() == 0 and sys.stderr.isatty():
        return
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def collective_failure(exc: BaseException) -> Optional[str]:
    """What a collective's RuntimeError (or its DistBackendError subclass) means, if it is one:
    another rank died (the connection to it broke) or hung (past ``--dist-timeout``)."""
    text = str(exc).lower()
    if any(s in text for s in ("connection reset", "connection closed", "broken pipe", "remote process exited")):
        return "another rank died (the connection to it was lost)"
    if "timed out" in text or ("timeout" in text and any(s in text for s in ("gloo", "nccl", "watchdog"))):
        return "a collective waited longer than --dist-timeout for the other ranks (one is hung or died)"
    return None


def report(exc: Exception, rank: int, grace: float = RANK0_GRACE) -> None:
    """One line per failure: rank 0 prints at once. Another rank first gives rank 0 ``grace``
    seconds, because the launcher kills every rank as soon as one exits non-zero: when rank 0 hits
    the same error (bad input is seen by every rank) its line is printed and this rank is killed
    while it waits; an error only this rank hits is still printed, with its rank."""
    if rank != 0:
        time.sleep(grace)
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"rosa_ds: error{where}: {exc}", file=sys.stderr, flush=True)
