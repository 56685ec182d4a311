"""Atomic checkpoints with ROSA state, and exact resume.

Layout of ``save_dir``:

    latest                    the tag of the newest complete checkpoint (replaced atomically)
    <tag>/                    DeepSpeed's own files (module, ZeRO partitions, optimizer, scheduler)
        rosa_state.json       ROSA config, resample count and history, schedule, world layout
        rosa_frozen.safetensors   W_f of every layer (ZeRO-3 only: DeepSpeed does not restore
                                  frozen partitions there; under ZeRO-1/2 its module file has W_f)
        rosa_masters.safetensors  quantized base only: the fp32 host master of W_f per layer
                                  (not in DeepSpeed's files; the quantized buffers are re-made
                                  from it on load, bit-identical: quantization is deterministic)
        rosa_frozen_masters_rank<r>.safetensors   bf16/fp16 W_f with frozen_master: the fp32
                                  masters rank r keeps (of the layers it owns)
        rosa_rng_rank<r>.pt   each rank's RNG states (dropout draws continue exactly)
        COMPLETE              written last, lists every file and its size

Everything is first written into ``<tag>.partial/``; only after all ranks finished does rank 0
write COMPLETE and rename the directory (an atomic ``os.replace`` on one filesystem), then
``latest``. A crash at any point leaves either the previous complete checkpoint or a
``.partial`` directory that loading refuses. Then every rank checks that it sees the published
checkpoint with its own files in it, and all ranks agree: on nodes that do not share the
checkpoint directory (node-local disks) the save fails on every rank, naming the hosts, instead
of leaving shards in ``.partial`` that a later resume trips over. Loading is agreed the same
way, so a checkpoint some ranks cannot read is an error on all of them, not a hang.

This module owns what it saves: ``RosaState`` (the engine's ROSA bookkeeping) and the DeepSpeed
engine's own state; it needs nothing else from the ``RosaEngine``.
"""
from __future__ import annotations

import json
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import RosaConfig
from ..inject import iter_rosa_layers
from ..schedule import ScheduleConfig
from ..utils.io import atomic_write_text, replace_dir
from ..utils.log import log_rank0
from .dist import all_gather_object, barrier, rank_and_world
from .params import gathered

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


@dataclass
class RosaState:
    """What a ROSA engine adds to DeepSpeed's own state; saved with every checkpoint."""

    rosa_config: Optional[RosaConfig] = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resamples: int = 0
    last_resample_step: Optional[int] = None  # DeepSpeed's global step of the last resample
    epoch: int = 0
    events: list = field(default_factory=list)
    applied_steps: int = 0  # optimizer steps applied (fp16 overflow-skipped ones not counted)
    last_resample_applied: Optional[int] = None  # applied_steps at the last resample

    def record_resample(self, index: int, step: int, seconds: float, counts: dict) -> dict:
        self.resamples, self.last_resample_step = index, step
        self.last_resample_applied = self.applied_steps
        event = {"event": "resample", "index": index, "step": step, "epoch": self.epoch,
                 "seconds": round(seconds, 4), **counts}
        self.events.append(event)
        return event

    def progress(self) -> dict:
        """The fields that change during training (restored on resume)."""
        return {"resamples": self.resamples, "last_resample_step": self.last_resample_step, "epoch": self.epoch,
                "events": self.events, "applied_steps": self.applied_steps,
                "last_resample_applied": self.last_resample_applied}

    def restore(self, progress: dict, global_step: int) -> None:
        """Set the saved fields (a checkpoint written before applied steps were counted: every
        step counts as applied, as it was then)."""
        progress = {"applied_steps": global_step, "last_resample_applied": progress.get("last_resample_step"),
                    **progress}
        for key, value in progress.items():
            setattr(self, key, value)


def describe(ds_engine, state: RosaState) -> dict:
    """The facts a resume must match: ROSA layers and rank, world size, ZeRO stage."""
    _, world = rank_and_world()
    layers = [[n, l.out_features, l.in_features, l.rank] for n, l in iter_rosa_layers(ds_engine.module)]
    return {"world_size": world, "zero_stage": int(ds_engine.zero_optimization_stage()),
            "rosa_config": state.rosa_config.to_dict() if state.rosa_config else None, "layers": layers}


def _z3_frozen(module) -> dict[str, torch.Tensor]:
    rank, _ = rank_and_world()
    out = {}
    for name, layer in iter_rosa_layers(module):
        if layer.quantized:  # W_f is the host master (rosa_masters.safetensors)
            continue
        w = layer.base_layer.weight
        with gathered([w]):  # collective, one layer at a time
            if rank == 0:
                out[name] = w.detach().cpu().clone()
    return out


def _masters(module, quantized: bool) -> dict[str, torch.Tensor]:
    """Layer name -> fp32 master of W_f held here: of the quantized bases (replicated on every
    rank), or of the bf16 / fp16 W_f this rank owns."""
    return {n: l.base_master.contiguous() for n, l in iter_rosa_layers(module)
            if l.has_master and l.quantized == quantized}


def _write_rank0_files(ds_engine, state: RosaState, partial: Path, frozen: dict, client_state: dict) -> None:
    from safetensors.torch import save_file

    if frozen:
        save_file({k: v.contiguous() for k, v in frozen.items()}, str(partial / "rosa_frozen.safetensors"))
    masters = _masters(ds_engine.module, quantized=True)
    if masters:
        save_file(masters, str(partial / "rosa_masters.safetensors"))
    saved = {"format": FORMAT, **describe(ds_engine, state), "global_step": int(ds_engine.global_steps),
             "schedule": asdict(state.schedule), "state": state.progress(), "client_state": client_state}
    atomic_write_text(partial / "rosa_state.json", json.dumps(saved, indent=1))


def _publish(root: Path, partial: Path, final: Path, tag: str) -> None:
    """Rank 0, after every rank wrote its files: COMPLETE, the rename, then ``latest``."""
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    atomic_write_text(partial / "COMPLETE", json.dumps({"tag": tag, "files": files}, indent=1))
    replace_dir(partial, final)
    atomic_write_text(root / "latest", tag)


def save(ds_engine, state: RosaState, root: Path, tag: str, client_state: dict) -> Path:
    """Write checkpoint ``tag`` under ``root`` (collective; see the module docstring)."""
    rank, _ = rank_and_world()
    final, partial = root / tag, root / f"{tag}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    ds_engine.save_checkpoint(str(root), tag=partial.name, client_state={"rosa_client": client_state},
                              save_latest=False)
    frozen = _z3_frozen(ds_engine.module) if ds_engine.zero_optimization_stage() == 3 else {}
    if rank == 0:
        _write_rank0_files(ds_engine, state, partial, frozen, client_state)
    own = _masters(ds_engine.module, quantized=False)
    if own:
        from safetensors.torch import save_file

        save_file(own, str(partial / f"rosa_frozen_masters_rank{rank}.safetensors"))
    torch.save(_rng_state(), partial / f"rosa_rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        _publish(root, partial, final, tag)
    barrier()
    _agree(lambda: _check_visible(final, rank), f"checkpoint {final} was not saved on every node")
    log_rank0(f"checkpoint saved: {final}")
    return final


def _check_visible(ckpt: Path, rank: int) -> None:
    """This rank sees the published checkpoint, and its own file is listed in COMPLETE, whole."""
    own = f"rosa_rng_rank{rank}.pt"
    if not (ckpt / "COMPLETE").is_file():
        raise CheckpointError(f"{ckpt}/COMPLETE is not visible here")
    size = json.loads((ckpt / "COMPLETE").read_text())["files"].get(own)
    if size is None or not (ckpt / own).is_file() or (ckpt / own).stat().st_size != size:
        raise CheckpointError(f"this rank's files are not in {ckpt} as rank 0 published it")


SHARED_FS = "the checkpoint directory must be one filesystem that every node sees (a shared file system)"


def _agree(check, what: str) -> None:
    """Run ``check`` on every rank; if it failed anywhere, raise on every rank (collective: an
    error on some ranks only would leave the others waiting in a collective). The same failure
    everywhere is raised as is; failures on some ranks name each rank's host and reason."""
    try:
        check()
        mine = None
    except (OSError, ValueError) as exc:
        mine = str(exc)
    found = all_gather_object((socket.gethostname(), mine))
    failures = [(r, host, msg) for r, (host, msg) in enumerate(found) if msg]
    if not failures:
        return
    if len(failures) == len(found) and len({msg for *_, msg in failures}) == 1:
        raise CheckpointError(failures[0][2])
    shown = "; ".join(f"rank {r} on {host}: {msg}" for r, host, msg in failures[:4])
    raise CheckpointError(f"{what}: {shown}{' ...' if len(failures) > 4 else ''}; {SHARED_FS}")


@torch.no_grad()
def _restore_masters(module, path: Path) -> None:
    """Every rank reads the masters and re-quantizes its buffers from them (no collective)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name, layer in iter_rosa_layers(module):
            if layer.quantized:
                layer.write_frozen(f.get_tensor(name))


def _restore_own_masters(module, path: Path) -> None:
    """This rank's fp32 masters of a bf16 / fp16 W_f (the module's W_f comes from DeepSpeed's files
    or rosa_frozen.safetensors)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for name, layer in iter_rosa_layers(module):
            if name in names:
                layer.restore_master(f.get_tensor(name))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve(root: Path, tag: Optional[str]) -> tuple[Path, str]:
    """(save_dir, tag) from a save dir (uses ``latest``) or a checkpoint dir; clear errors."""
    if tag is None and (root / "COMPLETE").exists():
        return root.parent, root.name
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            partials = sorted(p.name for p in root.glob("*.partial")) if root.is_dir() else []
            hint = f" (found only incomplete saves: {', '.join(partials)})" if partials else ""
            raise CheckpointError(f"no complete checkpoint in {root}{hint}; check the path, or start without --resume")
        tag = latest.read_text().strip()
    ckpt = root / tag
    if not (ckpt / "COMPLETE").exists():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or missing (no COMPLETE marker: its save was "
                              "interrupted); resume from an earlier complete checkpoint or start again")
    return root, tag


def check_compatible(saved: dict, now: dict, ckpt: Path) -> None:
    """All differences between the checkpoint and this run, in one error."""
    problems = []
    for key, label in (("world_size", "world size (ranks)"), ("zero_stage", "ZeRO stage")):
        if saved.get(key) != now[key]:
            problems.append(f"{label}: checkpoint {saved.get(key)}, this run {now[key]}")
    s_cfg, n_cfg = saved.get("rosa_config") or {}, now["rosa_config"] or {}
    for key in ("rank", "quantize_base"):
        if s_cfg.get(key) != n_cfg.get(key):
            problems.append(f"ROSA {key}: checkpoint {s_cfg.get(key)}, this run {n_cfg.get(key)}")
    s_layers, n_layers = [tuple(l) for l in saved.get("layers", [])], [tuple(l) for l in now["layers"]]
    if s_layers != n_layers:
        only_s = sorted({l[0] for l in s_layers} - {l[0] for l in n_layers})
        only_n = sorted({l[0] for l in n_layers} - {l[0] for l in s_layers})
        problems.append(f"ROSA target layers differ ({len(s_layers)} in checkpoint, {len(n_layers)} now; "
                        f"only in checkpoint: {only_s[:5]}, only now: {only_n[:5]})")
    if problems:
        raise CheckpointError(f"cannot resume from {ckpt}: " + "; ".join(problems)
                              + ". Resume with the same settings and number of ranks, or start a new run")


def _check_files(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    missing = [f for f, size in manifest["files"].items()
               if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {len(missing)} files missing or truncated "
                              f"({', '.join(missing[:3])}); resume from another checkpoint")


def load(ds_engine, state: RosaState, root: Path, tag: Optional[str]) -> dict:
    """Restore DeepSpeed's and ROSA's state from a checkpoint; returns its client state."""
    rank, _ = rank_and_world()
    found = {}

    def check() -> None:
        found["root"], found["tag"] = resolve(root, tag)
        ckpt = found["root"] / found["tag"]
        found["saved"] = json.loads((ckpt / "rosa_state.json").read_text())
        check_compatible(found["saved"], describe(ds_engine, state), ckpt)
        _check_files(ckpt)

    _agree(check, f"cannot resume from {root}")
    root, tag, saved = found["root"], found["tag"], found["saved"]
    ckpt = root / tag
    path, _ = ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    if saved["zero_stage"] == 3:
        _restore_z3_frozen(ds_engine.module, ckpt / "rosa_frozen.safetensors")
    if (ckpt / "rosa_masters.safetensors").is_file():
        _restore_masters(ds_engine.module, ckpt / "rosa_masters.safetensors")
    if (ckpt / f"rosa_frozen_masters_rank{rank}.safetensors").is_file():
        _restore_own_masters(ds_engine.module, ckpt / f"rosa_frozen_masters_rank{rank}.safetensors")
    _set_rng_state(torch.load(ckpt / f"rosa_rng_rank{rank}.pt", weights_only=False))
    state.restore(saved["state"], int(saved["global_step"]))
    log_rank0(f"resumed from {ckpt} at step {int(ds_engine.global_steps)} after {state.resamples} resamples")
    return saved.get("client_state", {})


@torch.no_grad()
def _restore_z3_frozen(module, path: Path) -> None:
    from safetensors import safe_open

    rank, _ = rank_and_world()
    with safe_open(str(path), framework="pt") as f:
        for name, layer in iter_rosa_layers(module):
            if layer.quantized:
                continue
            w = layer.base_layer.weight
            with gathered([w], modifier_rank=0):
                if rank == 0:
                    w.copy_(f.get_tensor(name))
