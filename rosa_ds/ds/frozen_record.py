"""The frozen state of a resample cycle, written once and shared by the cycle's checkpoints.

Between two resamples nothing frozen changes: W_f, the other frozen weights (embeddings, norms),
a quantized base's fp32 masters and the owners' fp32 masters of a bf16 W_f. A checkpoint therefore
stores only what training changes (DeepSpeed's files with ``exclude_frozen_parameters``: the
factors, their fp32 masters and optimizer state) and names the record of its cycle,
``<save_dir>/frozen/<run>-<resamples>/``, which the cycle's first checkpoint writes:

    rank<r>-<i>.safetensors          ZeRO-3: rank r's partition (``ds_tensor``) of every frozen parameter
    replicated-<i>.safetensors       ZeRO-1/2: every frozen parameter, whole (replicated; rank 0 writes)
    quantized_masters_rank<r>-<i>.safetensors  a quantized base's fp32 masters of the layers rank r owns
                                     (every rank keeps all of them and reads every rank's files)
    owner_masters_rank<r>-<i>.safetensors  the fp32 masters of a bf16 / fp16 W_f that rank r owns
    COMPLETE                     written last: every file's size and sha256 (``rosa_ds.utils.manifest``)

Each kind is cut into files of at most ``CHUNK_BYTES`` (1 GiB), so a GPU rank copies at most that
much to host memory at a time.

Nothing is gathered: every rank writes and reads only what it holds. Records are written into
``<key>.partial`` and renamed when complete; a record no kept checkpoint names is deleted with them.

No single point of failure: a cycle's checkpoints alternate between two copies of its record
(``<run>-<cycle>`` and ``<run>-<cycle>-b``, ``second_copy``), so the two newest checkpoints never
name the same record, and a save checks the hashes of the copy it builds on first, writing it
again when it is damaged (``rosa_ds.ds.checkpoint.save``). The cost: from a cycle's second
checkpoint on, two records are kept instead of one (one record more on disk: on the default job a
record is 538.1 MB beside 39.3 MB per checkpoint, README "Checkpoints"), and the second
checkpoint of each cycle writes a record (as the first does).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from ..inject import iter_rosa_layers
from ..owners import assign_owners
from ..utils.io import replace_dir
from ..utils.manifest import MANIFEST, damage, read_manifest, share, write_manifest
from ..utils.safetensors_io import write_safetensors
from .dist import all_gather_object, barrier, rank_and_world
from .params import is_zero3
from .write_guard import WriteGuard, gather_digests

RECORDS = "frozen"
CHUNK_BYTES = 1 << 30


SECOND = "-b"  # the suffix of a cycle's second copy


def second_copy(key: str) -> str:
    return key + SECOND


def record_dir(root: Path, key: str) -> Path:
    return Path(root) / RECORDS / key


def frozen_params(module) -> list[tuple[str, torch.nn.Parameter]]:
    """The frozen parameters, each once, in module order."""
    return [(n, p) for n, p in module.named_parameters() if not p.requires_grad]


def _own_tensors(module, rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors this rank writes into a record."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    params = frozen_params(module)
    if any(is_zero3(p) for _, p in params):
        out[f"rank{rank}"] = {n: p.ds_tensor.detach().reshape(-1) for n, p in params if is_zero3(p)}
    elif rank == 0:
        out["replicated"] = {n: p.detach() for n, p in params}
    layers = list(iter_rosa_layers(module))
    owners = assign_owners([l for _, l in layers], world)
    out[f"quantized_masters_rank{rank}"] = {n: l.base_master for n, l in layers
                                            if l.quantized and owners[l.layer_index] == rank}
    out[f"owner_masters_rank{rank}"] = {n: l.base_master for n, l in layers if l.has_master and not l.quantized}
    return {f: tensors for f, tensors in out.items() if tensors}


def _chunks(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in consecutive groups of at most ``CHUNK_BYTES`` (a larger tensor alone)."""
    out, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > CHUNK_BYTES:
            out.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return out + ([current] if current else [])


def _files(record: Path, kind: str) -> list[Path]:
    return sorted(record.glob(f"{kind}-*.safetensors"))


def is_complete(record: Path) -> bool:
    """The record exists and every file its manifest lists has its size (a stat per file; the
    digests are checked before a resume, ``rosa_ds.ds.verify``)."""
    try:
        files = read_manifest(record)["files"]
    except ValueError:  # missing or garbage: not complete (every rank must answer, never raise)
        return False
    return all((record / f).is_file() and (record / f).stat().st_size == size for f, size in files.items())


def damage_everywhere(record: Path) -> Optional[str]:
    """Collective: what is wrong with ``record``, naming the file, or None. Every rank checks the
    sizes and hashes its ``share`` of the files, so a save that builds on a record reads it once
    in all, split over the ranks."""
    rank, world = rank_and_world()
    try:
        files = read_manifest(record)["files"]
    except ValueError as exc:
        mine: Optional[str] = str(exc)
    else:
        mine = damage(record, hashed=share(files, rank, world))
    found = [p for p in all_gather_object(mine) if p]
    return found[0] if found else None


def partial_dir(root: Path, key: str) -> Path:
    return record_dir(root, key).with_name(key + ".partial")


def write(module, root: Path, key: str, guard: WriteGuard, needed: Callable[[], tuple[int, str]]) -> Path:
    """Write this cycle's record unless it exists (collective; every rank decides alike: the
    caller has agreed on ``exists`` across ranks). A write failing on any rank removes the
    partial record and raises ``CheckpointWriteError`` on every rank (``WriteGuard.agree``;
    ``needed``: the space the save needs, for its message). Returns its directory."""
    rank, world = rank_and_world()
    record, partial = record_dir(root, key), partial_dir(root, key)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        guard.run(partial, partial.mkdir, parents=True)
    barrier()
    for kind, tensors in _own_tensors(module, rank, world).items():
        for i, chunk in enumerate(_chunks(tensors)):
            path = partial / f"{kind}-{i + 1:05d}.safetensors"
            guard.run(path, write_safetensors, path, chunk)
    barrier()
    sizes, digests = gather_digests(partial, guard)
    guard.agree(record, lambda: shutil.rmtree(partial, ignore_errors=True), needed)
    if rank == 0:
        guard.run(partial / MANIFEST, write_manifest, partial, {"key": key}, sizes, digests)
        guard.run(record, replace_dir, partial, record)
    guard.agree(record, lambda: shutil.rmtree(partial, ignore_errors=True), needed)
    return record


@torch.no_grad()
def restore(module, record: Path) -> None:
    """Put the record's frozen state back into ``module`` (collective under ZeRO-3: parameters
    kept gathered, the persistent ones, are re-gathered from the restored partitions)."""
    from safetensors import safe_open

    rank, _ = rank_and_world()
    params = frozen_params(module)
    z3 = [p for _, p in params if is_zero3(p)]
    available = [p for p in z3 if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"]
    if available:  # drop the gathered copies: they are re-made from the restored partitions below
        available[0].partition(param_list=available, has_been_updated=False)
    by_name = dict(params)
    for path in _files(record, f"rank{rank}" if z3 else "replicated"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                p = by_name[name]
                target = p.ds_tensor.view(-1) if is_zero3(p) else p.data
                target.copy_(f.get_tensor(name).view_as(target))
    if available:
        available[0].all_gather(param_list=available)
    layers = dict(iter_rosa_layers(module))
    for kind, quantized in (("quantized_masters_rank*", True), (f"owner_masters_rank{rank}", False)):
        for path in _files(record, kind):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    master = f.get_tensor(name)
                    if quantized:  # the packed buffers are re-made from it, bit-identical
                        layers[name].base_master = master.contiguous()
                        layers[name].write_frozen(layers[name].base_master)
                    else:
                        layers[name].restore_master(master)


def prune(root: Path, keep_keys: set[str]) -> None:
    """Delete the records no kept checkpoint names (rank 0)."""
    base = Path(root) / RECORDS
    if not base.is_dir():
        return
    for entry in base.iterdir():
        if entry.name not in keep_keys:
            shutil.rmtree(entry, ignore_errors=True)
