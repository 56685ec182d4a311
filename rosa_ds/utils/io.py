"""Atomic files and directories, advisory locks, and the on-disk cache root.

Several ranks are often launched at the same moment on one machine. ``exclusive`` serialises
them with an advisory ``flock`` on a lock file: the first builds, the others block, then find the
finished entry. Everything is written under a temporary name in the target's own directory and
moved into place with ``os.replace`` (atomic on POSIX), so a reader never sees a half-written
file or directory, even when the writer is killed mid-write.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX only; elsewhere the atomic rename alone still keeps entries whole.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def cache_root() -> Path:
    """``$ROSA_DS_CACHE`` if set, else ``~/.cache/rosa_ds``."""
    env = os.environ.get("ROSA_DS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rosa_ds"


def stable_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of sha256 over a canonical JSON dump (stable across machines)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold an exclusive lock named after ``target`` (blocks while another process holds it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it becomes ``target``.

    ``replace=False`` (caches): if ``target`` appeared meanwhile, another process finished first
    and its entry is kept. ``replace=True`` (exports, checkpoints): an existing ``target`` is
    moved aside, the new one renamed into place, then the old one deleted, so at every moment
    one complete directory exists under the name or its ``.old`` sibling. On an exception the
    temporary directory is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700); the entry is an ordinary dir
    try:
        yield tmp
        if replace or not target.exists():
            replace_dir(tmp, target)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, target: Path) -> None:
    """Rename the finished directory ``src`` to ``target`` (same filesystem). An existing
    ``target`` is moved aside to ``<target>.old`` first and deleted last, so at every moment one
    complete directory exists under the name or its ``.old`` sibling."""
    if not target.exists():
        os.replace(src, target)
        return
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(src, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success ``os.replace`` it onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (fsync before the rename)."""
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def file_digest(path: Path, n: int = 16) -> str:
    """First ``n`` hex digits of the sha256 of a file's bytes: a cache key that names the content,
    so the same model file reached through another path (another virtualenv's copy) shares one
    cache entry. Reading a large file takes a second or so, hence the memo under ``cache_root()``,
    keyed by path, size and mtime: a changed file (new mtime) is hashed again."""
    st = os.stat(path)
    memo = cache_root() / "digests" / stable_hash([os.path.abspath(path), st.st_size, st.st_mtime_ns], 24)
    try:
        return memo.read_text().strip()[:n]
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    try:
        atomic_write_text(memo, h.hexdigest())
    except OSError:  # a read-only cache still gets the right key, just recomputed next time
        pass
    return h.hexdigest()[:n]
