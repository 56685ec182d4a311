"""The machine a benchmark ran on, recorded next to every figure (absolute times mean nothing
without it)."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe() -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "bitsandbytes"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": _cpu_model(), "cpu_cores": cores, "memory_gib": _mem_gib(), "gpu": gpu,
            "gpus": torch.cuda.device_count() if gpu else 0, "python": platform.python_version(), **versions}


def one_line(hw: dict) -> str:
    where = f"{hw['gpus']}x {hw['gpu']}" if hw.get("gpu") else "no GPU"
    return f"{hw['cpu']}, {hw['cpu_cores']} cores, {hw['memory_gib']} GiB RAM, {where}; torch {hw['torch']}, " \
           f"deepspeed {hw['deepspeed']}, transformers {hw['transformers']}, peft {hw['peft']}"
