"""What a benchmark ran: the machine, the package versions and the code commit, recorded next to
every figure (absolute times mean nothing without the machine, and any figure is stale without the
commit that produced it). Every results file holds a ``describe()`` record."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def code_commit(repo: Path = ROOT) -> str:
    """``git rev-parse HEAD`` of ``repo``, with ``+dirty`` when tracked files differ from it (untracked
    files, such as results being written, do not count); ``unknown`` outside a git checkout."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    head = git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


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
            "gpus": torch.cuda.device_count() if gpu else 0, "python": platform.python_version(), **versions,
            "commit": code_commit()}


def one_line(hw: dict) -> str:
    where = f"{hw['gpus']}x {hw['gpu']}" if hw.get("gpu") else "no GPU"
    code = f"; code {hw['commit']}" if hw.get("commit") else ""
    return f"{hw['cpu']}, {hw['cpu_cores']} cores, {hw['memory_gib']} GiB RAM, {where}; torch {hw['torch']}, " \
           f"deepspeed {hw['deepspeed']}, transformers {hw['transformers']}, peft {hw['peft']}{code}"
