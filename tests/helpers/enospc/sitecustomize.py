"""Test-only disk-full shim, active when this directory is on PYTHONPATH and
``ROSA_DS_TEST_ENOSPC=<dir>:<bytes>:<rank>`` is set: on that rank (RANK), writes to files under
<dir> fail with ENOSPC once <bytes> have been written there, as on a full filesystem.

Python's ``open`` (JSON, safetensors) and ``torch.save`` (DeepSpeed's files, RNG states; given a
file object so that its bytes pass through the counting writer) are wrapped; nothing in rosa_ds
knows about it.
"""
import builtins
import errno
import os

_SPEC = os.environ.get("ROSA_DS_TEST_ENOSPC", "")


def _install(directory: str, budget: int) -> None:
    import torch

    left = [budget]
    real_open, real_save = builtins.open, torch.save

    def under(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(directory)

    class Full:
        def __init__(self, f, path):
            self._f, self._path = f, os.fspath(path)

        def write(self, data):
            n = len(data) if not isinstance(data, memoryview) else data.nbytes
            if n > left[0]:
                self._f.write(data[: left[0]])
                left[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
            left[0] -= n
            return self._f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def shim_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f, file) if under(file) and any(m in mode for m in "wax") else f

    def shim_save(obj, f, *args, **kwargs):
        if not under(f):
            return real_save(obj, f, *args, **kwargs)
        with shim_open(f, "wb") as fh:
            return real_save(obj, fh, *args, **kwargs)

    builtins.open, torch.save = shim_open, shim_save


if _SPEC:
    _dir, _bytes, _rank = _SPEC.rsplit(":", 2)
    if os.environ.get("RANK") == _rank:
        _install(os.path.abspath(_dir), int(_bytes))
