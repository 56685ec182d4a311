"""The project's own errors: something the user can fix, said in one line that names the fix.

Every error rosa_ds raises on purpose derives from ``RosaError``; the command line prints such an
error as one line and exits with its ``exit_code``, while any other exception is a bug and keeps
its traceback. The subclasses also derive from the built-in type callers would expect
(``ValueError`` for a bad setting, ``FileNotFoundError`` for a missing input), so library code
that catches those keeps working.

A message names a setting by its config field, ``config_field("micro_batch")``, never by one front
end's spelling of it: the recipe's command line says ``--micro-batch``, a Hugging Face Trainer user
sets ``per_device_train_batch_size``. The field is written `micro_batch` (backquoted, as code is in
Markdown), which reads well as is, in a traceback for instance. A front end says once how it spells
fields, ``set_field_words(words)`` (the recipe's CLI for the run, the Trainer path in its setup),
and every ``RosaError`` renders its message through ``words`` when it is turned into text (``str``),
whatever layer raised it. Set once rather than rendered where the front end prints: a Trainer user
sees rosa_ds's errors as tracebacks out of ``Trainer.train``, which no rosa_ds code prints. A name
``words`` does not know (None) keeps its backquotes; text in backquotes that is not one identifier
(a command to run) is never touched.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Optional

Words = Callable[[str], Optional[str]]  # a field name -> how a front end says it (None: as is)

_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")
_words: Optional[Words] = None


def config_field(name: str) -> str:
    """A config field named in a message: `name`, for the front end to render (module docstring)."""
    return f"`{name}`"


def render_fields(text: str, words: Optional[Words]) -> str:
    """``text`` with every `field` said by ``words`` (unknown names and ``words=None``: as is)."""
    if words is None:
        return text
    return _FIELD.sub(lambda m: words(m.group(1)) or m.group(0), text)


def set_field_words(words: Optional[Words]) -> Optional[Words]:
    """Make ``words`` the process's way of saying fields in errors; returns the previous one."""
    global _words
    previous, _words = _words, words
    return previous


@contextlib.contextmanager
def field_words(words: Optional[Words]) -> Iterator[None]:
    """``set_field_words(words)`` for the ``with`` block only."""
    previous = set_field_words(words)
    try:
        yield
    finally:
        set_field_words(previous)


class RosaError(Exception):
    """Base of rosa_ds's own errors. ``exit_code``: what the command line exits with (2: bad input).
    Its text says config fields in the words the front end set (see the module docstring)."""

    exit_code = 2

    def __str__(self) -> str:
        return render_fields(super().__str__(), _words)


class ConfigError(RosaError, ValueError):
    """A setting, an input or a combination of them that rosa_ds cannot run."""


class InputNotFound(RosaError, FileNotFoundError):
    """A file or directory the run needs does not exist (the message says which, and what to give)."""
