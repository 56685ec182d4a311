"""Atomic checkpoints with ROSA state, and exact resume.

Layout of ``save_dir``:

    latest                    the tag of the newest complete checkpoint (replaced atomically)
    <tag>/                    DeepSpeed's own files without the frozen parameters
                              (``exclude_frozen_parameters``): the factors, their fp32 masters and
                              optimizer state, the scheduler
        rosa_state.json       ROSA config, resample count and history, schedule, world layout, and
                              the name of the cycle's frozen record
        rosa_rng_rank<r>.pt   each rank's RNG states (dropout draws continue exactly)
        COMPLETE              written last, lists every file, its size and sha256 (``utils.manifest``)
    frozen/<run>-<cycle>/     what is frozen between two resamples, once per cycle and shared by
                              the cycle's checkpoints (``frozen_record``): per-rank ZeRO-3
                              partitions of W_f, or its replicated copy, and the fp32 masters

Everything is first written into ``<tag>.partial/``; only after all ranks finished does rank 0
write COMPLETE and rename the directory (an atomic ``os.replace`` on one filesystem), then
``latest``. A crash at any point leaves either the previous complete checkpoint or a
``.partial`` directory that loading refuses. Then every rank checks that it sees the published
checkpoint with its own files in it, and all ranks agree: on nodes that do not share the
checkpoint directory (node-local disks) the save fails on every rank, naming the hosts, instead
of leaving shards in ``.partial`` that a later resume trips over. Loading is agreed the same
way, so a checkpoint some ranks cannot read is an error on all of them, not a hang. Nothing is
gathered to one rank: each writes and reads what it holds, and hashes a share of the files.

A write that fails on any rank (disk full, I/O error; ``write_guard``) does not leave the save
early, which would hang the others: all ranks agree, rank 0 removes the ``.partial`` directory
(and a frozen record this save began), and every rank raises ``CheckpointWriteError`` naming the
path, the space needed and the space free. Which checkpoint a resume loads, and whether its
files are intact, is decided before the model loads (``rosa_ds.ds.verify``).

This module owns what it saves: ``RosaState`` (the engine's ROSA bookkeeping) and the DeepSpeed
engine's own state; it needs nothing else from the ``RosaEngine``.
"""
from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import RosaConfig
from ..errors import config_field
from ..inject import iter_rosa_layers
from ..schedule import ScheduleConfig
from ..utils.io import atomic_write_text, replace_dir
from ..utils.log import log_rank0
from ..utils.manifest import MANIFEST, read_manifest, write_manifest
from . import frozen_record, verify
from .agree import CheckpointError, agree, everywhere
from .dist import all_gather_object, barrier, rank_and_world
from .write_guard import CheckpointWriteError, WriteGuard, gather_digests

__all__ = ["CheckpointError", "CheckpointWriteError", "RosaState", "save", "load", "prune", "remove_partials",
           "resolve", "check_compatible", "describe_module", "FORMAT"]

FORMAT = 2  # 2: frozen state in per-cycle records, DeepSpeed files without frozen parameters


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
    run_id: str = ""  # names this run's frozen records; the same on every rank (``new_run_id``)

    def frozen_key(self) -> str:
        """The frozen record of the current resample cycle."""
        return f"{self.run_id}-{self.resamples:04d}"

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
                "last_resample_applied": self.last_resample_applied, "run_id": self.run_id}

    def restore(self, progress: dict, global_step: int) -> None:
        """Set the saved fields (a checkpoint written before applied steps were counted: every
        step counts as applied, as it was then)."""
        progress = {"applied_steps": global_step, "last_resample_applied": progress.get("last_resample_step"),
                    **progress}
        for key, value in progress.items():
            setattr(self, key, value)


def new_run_id() -> str:
    """A random id, rank 0's on every rank (collective)."""
    return all_gather_object(uuid.uuid4().hex[:12])[0]


def _without_frozen_aliases(ds_engine):
    """``module_state_dict`` that also leaves out the other names of tied frozen weights: DeepSpeed's
    ``exclude_frozen_parameters`` drops each frozen parameter under its first name only, so a tied
    ``lm_head.weight`` (113 MB for SmolLM2) would still be saved in every checkpoint."""
    original = ds_engine.module_state_dict

    def module_state_dict(*args, **kwargs):
        sd = original(*args, **kwargs)
        if kwargs.get("exclude_frozen_parameters"):
            for name, p in ds_engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    return module_state_dict


def describe(ds_engine, state: RosaState) -> dict:
    """The facts a resume must match: ROSA layers and rank, world size, ZeRO stage."""
    return describe_module(ds_engine.module, int(ds_engine.zero_optimization_stage()), state)


def describe_module(module, zero_stage: int, state: RosaState) -> dict:
    """``describe`` for a module trained at ``zero_stage`` (0: no DeepSpeed)."""
    _, world = rank_and_world()
    layers = [[n, l.out_features, l.in_features, l.rank] for n, l in iter_rosa_layers(module)]
    return {"world_size": world, "zero_stage": zero_stage,
            "rosa_config": state.rosa_config.to_dict() if state.rosa_config else None, "layers": layers}


def save(ds_engine, state: RosaState, root: Path, tag: str, client_state: dict) -> Path:
    """Write checkpoint ``tag`` under ``root`` (collective; see the module docstring). A write
    failing on any rank (disk full, I/O error) removes what this save wrote and raises
    ``CheckpointWriteError`` on every rank; the previous checkpoint is untouched."""
    rank, _ = rank_and_world()
    final, partial = root / tag, root / f"{tag}.partial"
    guard = WriteGuard(root)
    if rank == 0:
        guard.run(root, root.mkdir, parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    key = _record_key(root, tag, state)
    record = frozen_record.record_dir(root, key)
    barrier()
    new_record = not everywhere(frozen_record.is_complete(record)) or not _intact(record)

    def needed() -> tuple[int, str]:
        return _space_needed(root, tag, new_record)

    def cleanup() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        if new_record:  # named by no complete checkpoint: it would only fill the disk
            shutil.rmtree(record, ignore_errors=True)

    if new_record:
        frozen_record.write(ds_engine.module, root, key, guard, needed)
    if not getattr(ds_engine, "_rosa_frozen_aliases_excluded", False):
        ds_engine.module_state_dict = _without_frozen_aliases(ds_engine)
        ds_engine._rosa_frozen_aliases_excluded = True
    with guard.around_deepspeed(ds_engine):
        ds_engine.save_checkpoint(str(root), tag=partial.name, client_state={"rosa_client": client_state},
                                  save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        saved = {"format": FORMAT, **describe(ds_engine, state), "global_step": int(ds_engine.global_steps),
                 "schedule": asdict(state.schedule), "state": state.progress(), "frozen": key,
                 "client_state": client_state}
        guard.run(partial / "rosa_state.json", atomic_write_text, partial / "rosa_state.json",
                  json.dumps(saved, indent=1))
    rng = partial / f"rosa_rng_rank{rank}.pt"
    guard.run(rng, torch.save, _rng_state(), rng)
    barrier()
    sizes, digests = gather_digests(partial, guard)
    guard.agree(final, cleanup, needed)
    if rank == 0:
        guard.run(final, _publish, root, partial, final, tag, sizes, digests)
    guard.agree(final, cleanup, needed)
    agree(lambda: _check_visible(final, rank, record), f"checkpoint {final} was not saved on every node")
    log_rank0(f"checkpoint saved: {final}")
    return final


def _previous(root: Path, tag: str) -> Optional[Path]:
    """The newest complete checkpoint before ``tag``, or None."""
    done = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file() and p.name < tag)
    return done[-1] if done else None


def _record_key(root: Path, tag: str, state: RosaState) -> str:
    """The copy of the cycle's frozen record that the checkpoint before ``tag`` does not name, so
    the two newest checkpoints never share one (``frozen_record``). Rank 0 reads it; every rank
    gets its answer (collective)."""
    base = state.frozen_key()
    named = None
    if rank_and_world()[0] == 0:
        prev = _previous(root, tag)
        try:
            named = json.loads((prev / "rosa_state.json").read_text()).get("frozen") if prev else None
        except (OSError, ValueError, AttributeError):
            named = None
    named = all_gather_object(named)[0]
    return frozen_record.second_copy(base) if named == base else base


def _intact(record: Path) -> bool:
    """Collective: the complete ``record`` a save builds on still matches its hashes; a damaged
    one is named and removed, to be written again (its content is the live frozen state)."""
    problem = frozen_record.damage_everywhere(record)
    if problem is None:
        return True
    log_rank0(f"the frozen record {record.name} this checkpoint builds on is damaged ({problem}): writing it again")
    if rank_and_world()[0] == 0:
        shutil.rmtree(record, ignore_errors=True)
    barrier()
    return False


def _space_needed(root: Path, tag: str, new_record: bool) -> tuple[int, str]:
    """(bytes, what the figure is) a save needs: the size of the newest complete checkpoint before
    ``tag``, with its frozen record when this save writes one; without one, what the save wrote."""
    partial = root / f"{tag}.partial"
    try:
        prev = _previous(root, tag)
        if prev is not None:
            nbytes = sum(read_manifest(prev)["files"].values())
            if new_record:
                key = json.loads((prev / "rosa_state.json").read_text())["frozen"]
                nbytes += sum(read_manifest(frozen_record.record_dir(root, key))["files"].values())
            return nbytes, f"the size of the previous checkpoint {prev.name}" + (
                " with its frozen record" if new_record else "")
    except (OSError, ValueError, KeyError):
        pass
    written = sum(f.stat().st_size for d in (partial, root / frozen_record.RECORDS) if d.is_dir()
                  for f in d.rglob("*") if f.is_file())
    return written, "at least what the save wrote before it failed"


def _publish(root: Path, partial: Path, final: Path, tag: str, sizes: dict, digests: dict) -> None:
    """Rank 0, after every rank wrote its files: COMPLETE, the rename, then ``latest``."""
    write_manifest(partial, {"tag": tag}, sizes, digests)
    replace_dir(partial, final)
    atomic_write_text(root / "latest", tag)


def _check_visible(ckpt: Path, rank: int, record: Path) -> None:
    """This rank sees the published checkpoint and its frozen record, with its own file in COMPLETE."""
    own = f"rosa_rng_rank{rank}.pt"
    if not (ckpt / "COMPLETE").is_file():
        raise CheckpointError(f"{ckpt}/COMPLETE is not visible here")
    size = json.loads((ckpt / "COMPLETE").read_text())["files"].get(own)
    if size is None or not (ckpt / own).is_file() or (ckpt / own).stat().st_size != size:
        raise CheckpointError(f"this rank's files are not in {ckpt} as rank 0 published it")
    if not frozen_record.is_complete(record):
        raise CheckpointError(f"the frozen record {record} is not complete here")


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints, and the newest older one that names another
    frozen record when they all name one (a fallback when that record is damaged), and the
    frozen records they name (rank 0)."""
    done = sorted(p for p in Path(root).glob("step_*") if (p / "COMPLETE").exists())
    records = {ckpt: _named_record(ckpt) for ckpt in done}
    kept = done[-keep:]
    if len({records[c] for c in kept}) == 1:
        kept += [c for c in done[:-keep] if records[c] not in (None, records[kept[-1]])][-1:]
    for old in done:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    frozen_record.prune(root, {records[c] for c in kept if records[c]})


def remove_partials(root: Path) -> list[str]:
    """Delete the ``.partial`` saves (checkpoints and frozen records) an interrupted run left in
    ``root`` (rank 0, while no save runs: a resumed run that never reaches that step again would
    keep them forever). Returns their names."""
    root = Path(root)
    found = [*root.glob("*.partial"), *(root / frozen_record.RECORDS).glob("*.partial")]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in found)


def _named_record(ckpt: Path) -> Optional[str]:
    try:
        return json.loads((ckpt / "rosa_state.json").read_text()).get("frozen")
    except (OSError, ValueError, AttributeError):
        return None


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
            raise CheckpointError(f"no complete checkpoint in {root}{hint}; check the path, or start without "
                                  f"{config_field('resume')}")
        tag = latest.read_text().strip()
    ckpt = root / tag
    if not (ckpt / "COMPLETE").exists():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or missing (no COMPLETE marker: its save was "
                              "interrupted); resume from an earlier complete checkpoint or start again")
    return root, tag


def check_compatible(saved: dict, now: dict, ckpt: Path) -> None:
    """Every difference between the checkpoint and this run (``describe`` of each) that a resume
    must not have, in one ``ResumeMismatch`` (``rosa_ds.ds.verify.compare``, the one check)."""
    refused, _ = verify.compare(verify.module_facts(saved), verify.module_facts({**now, "format": FORMAT}))
    if refused:
        raise verify.ResumeMismatch(ckpt, refused)


def _check_files(ckpt: Path, record: Path) -> None:
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    missing = [f for f, size in manifest["files"].items()
               if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {len(missing)} files missing or truncated "
                              f"({', '.join(missing[:3])}); resume from another checkpoint")
    if not frozen_record.is_complete(record):
        raise CheckpointError(f"checkpoint {ckpt} names the frozen record {record}, which is missing or damaged; "
                              "resume from another checkpoint")


def load(ds_engine, state: RosaState, root: Path, tag: Optional[str]) -> dict:
    """Restore DeepSpeed's and ROSA's state from a checkpoint; returns its client state."""
    rank, _ = rank_and_world()
    found = {}

    def check() -> None:
        found["root"], found["tag"] = resolve(root, tag)
        ckpt = found["root"] / found["tag"]
        found["saved"] = json.loads((ckpt / "rosa_state.json").read_text())
        check_compatible(found["saved"], describe(ds_engine, state), ckpt)
        _check_files(ckpt, frozen_record.record_dir(found["root"], found["saved"]["frozen"]))

    agree(check, f"cannot resume from {root}")
    root, tag, saved = found["root"], found["tag"], found["saved"]
    ckpt = root / tag
    # the frozen parameters are not in DeepSpeed's files: the record restores them (strict=False)
    path, _ = ds_engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                        load_module_strict=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    frozen_record.restore(ds_engine.module, frozen_record.record_dir(root, saved["frozen"]))
    _set_rng_state(torch.load(ckpt / f"rosa_rng_rank{rank}.pt", weights_only=False))
    state.restore(saved["state"], int(saved["global_step"]))
    log_rank0(f"resumed from {ckpt} at step {int(ds_engine.global_steps)} after {state.resamples} resamples")
    return saved.get("client_state", {})
