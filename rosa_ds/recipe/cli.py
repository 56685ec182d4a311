"""Command-line entry: a clear one-line error for bad input instead of a deep stack trace."""
from __future__ import annotations

import os
import sys
from typing import Optional

from ..utils.dist import global_rank

# Errors that describe bad input (the project's own error types subclass ValueError); anything
# else is a bug and keeps its traceback. ROSA_DS_DEBUG=1 keeps the traceback for these too.
USER_ERRORS = (ValueError, FileNotFoundError)


def main(argv: Optional[list] = None) -> int:
    from .config import parse_args
    from .trainer import Trainer

    try:
        cfg = parse_args(argv)
        Trainer(cfg).run()
    except USER_ERRORS as exc:
        if os.environ.get("ROSA_DS_DEBUG") == "1":
            raise
        if global_rank() == 0:
            print(f"rosa_ds: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
