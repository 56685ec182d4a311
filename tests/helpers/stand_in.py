"""The CPU stand-in for a GPU accelerator: DeepSpeed's CPU accelerator with another current device.

The seam asks for its device in one place, ``rosa_ds.ds.dist.device()`` (from DeepSpeed's
``get_accelerator().current_device_name()``), so replacing ``rosa_ds.ds.dist.get_accelerator``
reaches every seam module. ``meta`` makes a tensor left on the CPU next to the accelerator's a
device mix that fails (as NCCL would reject it); ``cpu`` with index 1 computes for real and shows
that nothing assumes device 0 (a GPU rank's device is cuda:LOCAL_RANK).
"""
from __future__ import annotations

import torch


class StandInAccelerator:
    """DeepSpeed's accelerator, except for the device it names as current."""

    def __init__(self, real, device: torch.device) -> None:
        self.real, self.device = real, torch.device(device)

    def current_device_name(self) -> str:
        return str(self.device)

    def current_device(self) -> int:
        return self.device.index or 0

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def install(device: torch.device, patch=None) -> None:
    """Make ``device`` the seam's accelerator device: with ``patch`` (pytest's
    ``monkeypatch.setattr``) for one test, else for the rest of the process (a rank script)."""
    from rosa_ds.ds import dist

    stand_in = StandInAccelerator(dist.get_accelerator(), device)
    (patch or setattr)(dist, "get_accelerator", lambda: stand_in)


def seam_devices() -> dict[str, str]:
    """The device every seam module that makes tensors computes ``device()`` to be."""
    import importlib

    names = ("dist", "exchange", "export", "params", "partitioned", "prepare", "replicated", "resample")
    return {n: str(importlib.import_module(f"rosa_ds.ds.{n}").device()) for n in names}
