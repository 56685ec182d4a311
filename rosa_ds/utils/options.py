"""Typed dataclass options: each field carries its one-line help, choices and lower bound.

A component config (``RosaConfig``, ``ScheduleConfig``, ``DataConfig``, the recipe's own
settings) declares its fields with ``opt`` and calls ``check_options(self)`` once in
``__post_init__``: values are coerced to the declared type (int -> float, list -> tuple) and
checked against choices and bounds. A bad value raises ``OptionError``, which names the field as
``Config.field`` for library users; the command line reports the same problem with the flag
derived from the field name (``--micro-batch``), see ``OptionError.for_flag``. Fields whose
metadata has ``flag=False`` are not command-line options (e.g. a seed the recipe sets for all).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Optional, Union

from ..errors import ConfigError


class OptionError(ConfigError):
    """A bad value of one option: ``owner.name problem`` (``--flag problem`` on the command line)."""

    def __init__(self, owner: str, name: str, problem: str) -> None:
        self.owner, self.name, self.problem = owner, name, problem
        super().__init__(f"{owner}.{name} {problem}")

    def for_flag(self) -> ConfigError:
        return ConfigError(f"{flag_name(self.name)} {self.problem}")


def opt(default: Any = dataclasses.MISSING, help: str = "", choices: tuple = (), minimum: Optional[float] = None,
        flag: bool = True, default_factory: Any = dataclasses.MISSING, compare: bool = True, **argparse_kw) -> Any:
    """A dataclass field with its help text, allowed choices and lower bound (``argparse_kw``:
    extra ``add_argument`` keywords such as ``nargs``)."""
    meta = {"help": help, "choices": tuple(choices), "min": minimum, "flag": flag, "argparse": argparse_kw}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, compare=compare, metadata=meta)
    return dataclasses.field(default=default, compare=compare, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_fields(cls_or_obj) -> list[dataclasses.Field]:
    """Fields declared with ``opt`` (those with help metadata), in declaration order."""
    return [f for f in dataclasses.fields(cls_or_obj) if "help" in f.metadata]


def flag_fields(cls_or_obj) -> list[dataclasses.Field]:
    """The fields that are command-line flags."""
    return [f for f in option_fields(cls_or_obj) if f.metadata["flag"]]


@functools.cache
def hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def allowed_types(hint: Any) -> list:
    """The non-None alternatives of a hint, as plain classes (``list[str]`` -> ``list``)."""
    args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    return [typing.get_origin(a) or a for a in args if a is not type(None)]


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to the hint's type). int -> float, list <-> tuple of strings."""
    if value is None:
        return is_optional(hint), None
    for kind in allowed_types(hint):
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if kind in (list, tuple) and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return True, kind(value)
        if kind in (str, bool) and type(value) is kind:
            return True, value
        if kind is typing.Any:
            return True, value
    return False, value


def type_label(hint: Any) -> str:
    names = {float: "a number", int: "an integer", str: "a string", bool: "true or false",
             list: "a list of names", tuple: "a list of names"}
    label = " or ".join(names.get(k, getattr(k, "__name__", str(k))) for k in allowed_types(hint))
    return label + (" or none" if is_optional(hint) else "")


def check_options(obj) -> None:
    """Coerce and check every ``opt`` field of the dataclass instance ``obj`` (see module doc)."""
    owner = type(obj).__name__
    types = hints(type(obj))
    for f in option_fields(obj):
        ok, value = coerce(getattr(obj, f.name), types[f.name])
        if not ok:
            raw = getattr(obj, f.name)
            raise OptionError(owner, f.name, f"must be {type_label(types[f.name])}, got {raw!r} "
                                             f"({type(raw).__name__})")
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
            raise OptionError(owner, f.name, f"must be a finite number, got {value}")
        choices, minimum = f.metadata["choices"], f.metadata["min"]
        if choices and value is not None and value not in choices:
            raise OptionError(owner, f.name, f"{value!r} does not exist; choose one of {', '.join(map(str, choices))}")
        if minimum is not None and value is not None and value < minimum:
            raise OptionError(owner, f.name, f"must be >= {minimum:g}, got {value}")
        object.__setattr__(obj, f.name, value)


def help_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = list(default) if isinstance(default, tuple) else default
    return f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
