"""The project's own errors: something the user can fix, said in one line that names the fix.

Every error rosa_ds raises on purpose derives from ``RosaError``; the command line prints such an
error as one line and exits with its ``exit_code``, while any other exception is a bug and keeps
its traceback. The subclasses also derive from the built-in type callers would expect
(``ValueError`` for a bad setting, ``FileNotFoundError`` for a missing input), so library code
that catches those keeps working.
"""
from __future__ import annotations


class RosaError(Exception):
    """Base of rosa_ds's own errors. ``exit_code``: what the command line exits with (2: bad input)."""

    exit_code = 2


class ConfigError(RosaError, ValueError):
    """A setting, an input or a combination of them that rosa_ds cannot run."""


class InputNotFound(RosaError, FileNotFoundError):
    """A file or directory the run needs does not exist (the message says which, and what to give)."""
