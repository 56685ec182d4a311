"""How the recipe's command line says a config field in an error message: as its flag.

Lower layers name settings by field (``rosa_ds.errors.config_field``); ``cli.main`` makes ``flag_words``
the way errors say them during the run, so `micro_batch` reads ``--micro-batch``. A flag derives
from its field by ``flag_name``; ``FLAG_FIELD`` lists the only fields said by another field's flag.
"""
from __future__ import annotations

import functools
from typing import Optional

from ..utils.options import flag_name

# Run values (rosa_ds.ds.config.RunValues) the recipe computes from a flag of another name: warmup
# steps from --warmup (a fraction of the run or a count), total steps from --max-steps (or --epochs).
FLAG_FIELD = {"warmup_steps": "warmup", "total_steps": "max_steps"}


@functools.cache
def flag_fields() -> frozenset[str]:
    """Names of the fields that are the recipe's flags (read lazily: the config imports torch)."""
    from .config import all_flag_fields

    return frozenset(f.name for _, f in all_flag_fields())


def flag_words(name: str) -> Optional[str]:
    """The recipe's flag for the field ``name`` (``micro_batch`` -> ``--micro-batch``); None: not one."""
    name = FLAG_FIELD.get(name, name)
    return flag_name(name) if name in flag_fields() else None
