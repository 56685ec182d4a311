"""Writing safetensors files straight from tensor memory.

``safetensors.torch.save_file`` first turns every tensor into a Python ``bytes`` copy, so writing
a shard holds it twice. This writes the same format (an 8-byte little-endian header length, the
JSON header padded with spaces to a multiple of 8, then each tensor's raw bytes in order) from a
view of each tensor's memory: no copy on the host, one tensor at a time from a device.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import ConfigError

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Write ``tensors`` to ``path`` in the safetensors format; returns the bytes of tensor data."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            host = t.detach().to("cpu").contiguous()
            if host.numel():
                f.write(memoryview(host.view(torch.uint8).numpy()))
    return offset


class SafetensorsStream:
    """A safetensors file written tensor by tensor: the header (every name, dtype and shape, known
    in advance) first, then each tensor's bytes as it arrives, in the header's order. Only one
    tensor is ever in memory for it."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]], metadata: dict | None = None):
        header, offset = {}, 0
        for name, shape, dtype in entries:
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [(n, list(s), d) for n, s, d in entries]
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)
        self.done = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.done]
        got = (name, list(tensor.shape), tensor.dtype)
        if got != want:
            raise RuntimeError(f"rosa_ds bug: streamed tensor {got} where the header says {want}")
        host = tensor.detach().to("cpu").contiguous()
        if host.numel():
            self.file.write(memoryview(host.view(torch.uint8).numpy()))
        self.done += 1

    def close(self) -> None:
        self.file.close()
        if self.done != len(self.expected):
            raise RuntimeError(f"rosa_ds bug: {self.done} of {len(self.expected)} tensors were streamed")


def check_safetensors(path: Path) -> None:
    """Raise ValueError naming ``path`` unless its header parses and its tensors' byte ranges end
    exactly at the end of the file (a truncated or overwritten header is caught without reading
    the data; same-size damage to the data itself cannot be seen without a checksum)."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or n > size - 8 or n > 100 * 2**20:
            problem = "no valid header"
        else:
            try:
                header = json.loads(f.read(n))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                problem = "its header is not valid safetensors JSON"
            else:
                expected = 8 + n + max(ends, default=0)
                if expected != size:
                    problem = (f"truncated: its header describes {expected:,} bytes, the file has {size:,}"
                               if expected > size else f"{size - expected:,} bytes beyond what its header describes")
    if problem:
        raise ConfigError(f"model file {path} is damaged ({problem}); copy or convert the model again")
