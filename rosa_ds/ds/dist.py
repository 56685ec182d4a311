"""Process group and device: the accelerator device every tensor of the seam lives on.

One device discipline: every tensor the seam creates for a collective, or computes with
DeepSpeed's parameters, is made on ``device()``: the accelerator's current device, which
``init_distributed`` selects from LOCAL_RANK before the first collective (cuda:LOCAL_RANK on a
GPU node; the CPU accelerator's "cpu" otherwise). NCCL rejects CPU tensors and every rank's
collectives would run on cuda:0 without the selection; gloo on the CPU accepts anything, so the
collective wrappers below check the device themselves, which makes a CPU test fail where a GPU
run would crash.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ..errors import ConfigError
from ..utils.dist import bounded_host_allocator, free_port, local_rank, rank_and_world

__all__ = ["device", "init_distributed", "skip_cpu_shm_build", "shutdown_distributed", "barrier", "all_reduce",
           "broadcast", "rank_and_world", "is_distributed", "accelerator_name", "run_peak_bytes", "synchronize"]


def accelerator_name() -> str:
    """``cuda``, ``cpu``, ... : DeepSpeed's accelerator (what ``device()`` is a device of)."""
    return get_accelerator().device_name()


def device() -> torch.device:
    """The accelerator device of this rank (after ``init_distributed``: cuda:LOCAL_RANK on GPUs)."""
    return torch.device(get_accelerator().current_device_name())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _select_device() -> None:
    """Bind this process to its accelerator from LOCAL_RANK, before any collective or CUDA
    allocation (DeepSpeed's launcher sets LOCAL_RANK; a single process is local rank 0)."""
    if accelerator_name() != "cpu":
        get_accelerator().set_device(local_rank())


def _threads_per_rank() -> None:
    """CPU threads per rank = this node's cores / its ranks, unless OMP_NUM_THREADS says otherwise:
    torch defaults every process to all cores, so 8 ranks of a node would run 8x oversubscribed
    (the initial SVDs and the resample's CPU work slow down several-fold)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(ranks, 1)))


def skip_cpu_shm_build() -> None:
    """On the CPU accelerator, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op
    when it starts the process group (see ``init_distributed``); ROSA_DS_CPU_SHM=1 keeps the build.
    Also for process groups that others start (the Trainer's accelerate), hence a function."""
    if accelerator_name() == "cpu" and os.environ.get("ROSA_DS_CPU_SHM", "0") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_minutes: Optional[float] = None) -> None:
    """Start the process group (NCCL on CUDA, gloo on the CPU accelerator) if the launcher did not,
    after selecting this rank's device.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at this point: a
    C++ build on every fresh machine, and a build killed halfway leaves a lock that hangs every
    later start. It only speeds up CPU all-reduce, so it is skipped unless ROSA_DS_CPU_SHM=1.
    """
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # a plain `python train.py`: a one-process group (DeepSpeed would try MPI discovery)
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    _select_device()
    _threads_per_rank()
    bounded_host_allocator()
    if dist.is_available() and dist.is_initialized():
        return
    skip_cpu_shm_build()
    kwargs = {}
    if timeout_minutes:
        kwargs["timeout"] = datetime.timedelta(minutes=timeout_minutes)
        _default_group_timeout(kwargs["timeout"])
    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **kwargs)
    except RuntimeError as exc:
        if "EADDRINUSE" not in str(exc) and "address already in use" not in str(exc).lower():
            raise
        port = os.environ.get("MASTER_PORT", "29500")
        raise ConfigError(f"the rendezvous port {port} (--master_port of the launcher) is in use on "
                          f"{os.environ.get('MASTER_ADDR', 'this host')} (another job?); choose a free one, e.g. "
                          f"--master_port {free_port()}") from None


def adopt_process_group() -> None:
    """Hand DeepSpeed's comm layer a torch process group another library started. On a CPU,
    ``TrainingArguments(use_cpu=True, deepspeed=...)`` has accelerate start gloo itself
    (MULTI_CPU) without telling DeepSpeed, so a ``zero.Init`` before the Trainer (ZeRO-3's
    ``from_pretrained``) sizes the batch for a world of 1 and asserts. No-op without a group or
    once DeepSpeed has one; DeepSpeed wraps the existing group (no new rendezvous)."""
    import deepspeed.comm as ds_comm

    if dist.is_available() and dist.is_initialized() and not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make ``timeout`` the default of every process group created later. torch gives a new group
    (DeepSpeed's data-parallel and ZeRO groups, where a ZeRO step's collectives run) its module
    default (30 min for gloo, 10 for NCCL), not the world group's timeout, so a hung rank would
    keep the others waiting that long whatever the world group says."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def shutdown_distributed() -> None:
    """Leave the process group cleanly once every rank is done (call last).

    Exiting with a live gloo group lets its C++ threads be destroyed during interpreter
    teardown, which intermittently aborts a finished rank ("terminate called without an active
    exception", exit -6) and turns a completed job into a failed launch."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def synchronize() -> None:
    """Wait for the accelerator's queued work (a no-op on the CPU): read clocks only after it."""
    get_accelerator().synchronize()


_RUN_PEAK = {"allocated": 0, "reserved": 0}  # the highs seen before each phase reset (run_peak_bytes)


def _fold_run_peak() -> None:
    acc = get_accelerator()
    _RUN_PEAK["allocated"] = max(_RUN_PEAK["allocated"], int(acc.max_memory_allocated()))
    _RUN_PEAK["reserved"] = max(_RUN_PEAK["reserved"], int(acc.max_memory_reserved()))


def run_peak_bytes() -> dict:
    """The accelerator's peak allocated and reserved bytes over the whole process so far, whatever
    phase resets ``PeakMemory`` made ({} on the CPU accelerator, whose counters are process RSS)."""
    if accelerator_name() == "cpu":
        return {}
    _fold_run_peak()
    return {"device_peak_allocated_bytes": _RUN_PEAK["allocated"], "device_peak_reserved_bytes": _RUN_PEAK["reserved"]}


class PeakMemory:
    """The accelerator's peak allocated bytes over a phase: created at the phase's start (resets
    the peak, after folding the high so far into ``run_peak_bytes``), ``read`` at its end. Only on
    a GPU: the CPU accelerator's counters are process RSS."""

    def __init__(self) -> None:
        self.active = accelerator_name() != "cpu"
        if self.active:
            _fold_run_peak()
            get_accelerator().reset_peak_memory_stats()
            self.start = int(get_accelerator().memory_allocated())

    def read(self, phase: str) -> dict:
        """{"<phase>_peak_bytes": peak, "<phase>_extra_bytes": peak - allocated at the start}."""
        if not self.active:
            return {}
        peak = int(get_accelerator().max_memory_allocated())
        return {f"{phase}_peak_bytes": peak, f"{phase}_extra_bytes": peak - self.start}


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it lives on ``device()``; a clear error otherwise (what NCCL would reject)."""
    dev = device()
    if t.device.type != dev.type or (dev.index is not None and t.device.index not in (None, dev.index)):
        raise RuntimeError(f"rosa_ds bug: a {tuple(t.shape)} tensor on {t.device} was handed to a collective "
                           f"on {dev}; every tensor of a collective must live on the accelerator device")
    return t


def all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(check_device(t), group=group)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def send(t: torch.Tensor, dst: int) -> None:
    """Point-to-point send of a contiguous tensor on ``device()`` to global rank ``dst``."""
    dist.send(check_device(t.contiguous()), dst=dst)


def recv(t: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into ``t`` (on ``device()``) from global rank ``src``."""
    dist.recv(check_device(t), src=src)
    return t


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` (no-op in a one-rank world). ``t`` must be
    contiguous: gloo garbles strided tensors (``torch.linalg.svd`` returns strided U/Vh)."""
    if is_distributed():
        if not t.is_contiguous():
            raise RuntimeError("rosa_ds bug: broadcast of a non-contiguous tensor; call .contiguous() first")
        dist.broadcast(check_device(t), src=src)
    return t
