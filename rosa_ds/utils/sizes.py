"""Byte sizes as people write them: "50GB", "500MB", "80GiB", "1.5TiB", "4096" (bytes)."""
from __future__ import annotations

import re

from ..errors import ConfigError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes of ``text`` (decimal units KB/MB/GB/TB, binary KiB/MiB/GiB/TiB); a ValueError names
    what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in UNITS:
        raise ConfigError(f"{text!r} is not a size; write e.g. 500MB, 50GB or 80GiB")
    return int(float(match.group(1)) * UNITS[unit])


def format_size(nbytes: float) -> str:
    """``1.50 GiB``-style text (binary units)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
