"""The ``COMPLETE`` manifest of a written directory (a checkpoint, a frozen record): every file's
size and sha256, and the check that the files on disk still match it.

    {"tag": "step_00000012", "files": {"rosa_state.json": 1805, ...},
     "sha256": {"rosa_state.json": "9f2c...", ...}}

The sizes find a missing or truncated file with one ``stat`` each; the digests find damage that
keeps the size (a flipped bit, a block of zeros written back by a failing disk or a torn copy).
sha256 (hashlib, OpenSSL) hashes about 1 GB/s per core on the CI CPU; the writers split the
files of a save over the ranks (``share``), so each hashes about 1/world of it. A manifest
without digests (written before they existed) is checked by size only.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .io import atomic_write_text

MANIFEST = "COMPLETE"
HASH = "sha256"
BLOCK = 8 << 20  # bytes read per update: large enough to run at the hash's speed, small in memory


def file_digest(path: Path) -> str:
    """Hex sha256 of a file, read in ``BLOCK`` pieces."""
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def listing(directory: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under ``directory`` but the manifest, sorted."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files ``rank`` hashes: largest first, each to the rank with the fewest bytes so far
    (deterministic, so every rank computes the same split from the same listing)."""
    load, mine = [0] * world, []
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += size
        if r == rank:
            mine.append(name)
    return mine


def write_manifest(directory: Path, header: dict, sizes: dict[str, int], digests: dict[str, str]) -> None:
    """Write ``COMPLETE`` (atomically) with ``header``, the sizes and the digests."""
    body = {**header, "files": sizes, HASH: {name: digests[name] for name in sizes}}
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(body, indent=1))


def read_manifest(directory: Path) -> dict:
    """The parsed manifest; ``ValueError`` naming it if it is missing or not a manifest."""
    path = Path(directory) / MANIFEST
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing (its save did not finish)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable manifest ({type(exc).__name__})") from None
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        raise ConfigError(f"{path} is not a manifest (no file list)")
    return body


def damage(directory: Path, hashed: Optional[Iterable[str]] = None) -> Optional[str]:
    """None if every file the manifest lists is there with its size and digest; otherwise what is
    wrong, naming the file (the first one found; sizes are checked for all files before any hash).
    ``hashed``: the files whose digests are checked (a rank's ``share``); default all."""
    directory = Path(directory)
    try:
        body = read_manifest(directory)
    except ValueError as exc:
        return str(exc)
    problems = []
    for name, size in body["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (actual := path.stat().st_size) != size:
            how = f"truncated ({actual} of {size} bytes)" if actual < size else f"{actual} bytes, not {size}"
            problems.append(f"{path} is {how}")
    if problems:
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        return problems[0] + more
    names = None if hashed is None else set(hashed)
    for name, digest in (body.get(HASH) or {}).items():
        if names is not None and name not in names:
            continue
        try:
            if file_digest(directory / name) != digest:
                return f"{directory / name} is corrupted (its {HASH} differs from {MANIFEST}'s)"
        except OSError as exc:
            return f"{directory / name} cannot be read ({exc.strerror or exc})"
    return None
