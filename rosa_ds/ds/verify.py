"""Which checkpoint a resume loads, decided from the files alone, before any weight loads.

``choose`` runs in ``Trainer.check`` on every rank independently (no process group exists yet);
it reads only the files, so every rank chooses the same checkpoint. A checkpoint is intact when
its ``COMPLETE`` manifest lists files that are all there with their sizes and sha256, its
``rosa_state.json`` reads, and the frozen record it names is intact the same way
(``rosa_ds.utils.manifest.damage``).

    --resume of a checkpoints dir (or of an output dir, or the bare flag): ``latest`` first, then
        the older ``step_*`` checkpoints, newest first; every damaged one is passed over with a
        warning naming the file; a garbage ``latest`` (empty, not text, naming no checkpoint) is
        named and ignored, and the ``step_*`` directories are scanned instead.
    --resume of one checkpoint: it must be intact, or the error names the damaged file.

``check_compatible`` then compares what resuming needs to match (ranks, ZeRO stage, method, ROSA
rank) with this run's settings; ``rosa_ds.ds.checkpoint.load`` checks the rest with the model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..utils.manifest import MANIFEST, damage
from .agree import CheckpointError
from .frozen_record import RECORDS, record_dir

STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class Choice:
    """The checkpoint to load, its ``rosa_state.json`` and one warning per thing passed over."""

    path: Path
    saved: dict
    warnings: list[str] = field(default_factory=list)


def checkpoint_damage(ckpt: Path) -> Optional[str]:
    """None if ``ckpt`` and its frozen record are intact, else what is wrong, naming the file."""
    problem = damage(ckpt)
    if problem:
        return problem
    state = ckpt / "rosa_state.json"
    try:
        key = json.loads(state.read_text())["frozen"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{state} is missing or unreadable"
    record = record_dir(ckpt.parent, str(key))
    problem = damage(record)
    return f"its frozen record: {problem}" if problem else None


def _step(path: Path) -> int:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _is_checkpoint_name(tag: str) -> bool:
    """Not the frozen records' directory, nor an interrupted or replaced save."""
    return tag != RECORDS and not tag.endswith((".partial", ".old"))


def read_latest(root: Path) -> tuple[Optional[Path], Optional[str]]:
    """(the checkpoint ``latest`` names, or None; a warning if ``latest`` is garbage)."""
    latest = root / "latest"
    if not latest.exists():
        return None, None
    try:
        tag = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"{latest} is not text: ignored, using the newest intact step_* checkpoint"
    if not tag:
        return None, f"{latest} is empty: ignored, using the newest intact step_* checkpoint"
    if "/" in tag or not tag.isprintable() or not (root / tag).is_dir() or not _is_checkpoint_name(tag):
        return None, (f"{latest} names {tag[:40]!r}, which is no checkpoint in {root}: ignored, "
                      "using the newest intact step_* checkpoint")
    return root / tag, None


def candidates(root: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints of a checkpoints dir in the order a resume tries them, and warnings."""
    named, note = read_latest(root)
    steps = sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)), key=_step, reverse=True)
    if named is None:
        return steps, [note] if note else []
    return [named] + [p for p in steps if p != named and (_step(named) < 0 or _step(p) < _step(named))], []


def container(where: Path) -> Optional[Path]:
    """The checkpoints dir ``where`` stands for (itself, or an output dir's ``checkpoints``), or
    None if ``where`` is one checkpoint (it holds a manifest, ``rosa_state.json`` or ``.pt`` files)."""
    if (where / MANIFEST).exists() or (where / "rosa_state.json").exists() or any(where.glob("*.pt")):
        return None
    holds = (where / "latest").exists() or any(STEP_DIR.match(p.name) for p in where.iterdir())
    return where / "checkpoints" if not holds and (where / "checkpoints").is_dir() else where


def choose(where: Path) -> Choice:
    """The checkpoint ``--resume where`` loads (see the module docstring)."""
    where = Path(where)
    if not where.is_dir():
        raise CheckpointError(f"--resume {where}: no such directory; give a checkpoint or a checkpoints directory")
    root = container(where)
    if root is None:
        problem = checkpoint_damage(where)
        if problem:
            raise CheckpointError(f"--resume {where}: the checkpoint is damaged: {problem}; resume from another "
                                  "checkpoint (or its checkpoints directory, which skips damaged ones) or start "
                                  "again without --resume")
        return Choice(where, _saved(where))
    order, warnings = candidates(root)
    damaged = []
    for ckpt in order:
        problem = checkpoint_damage(ckpt)
        if problem is None:
            return Choice(ckpt, _saved(ckpt), warnings)
        damaged.append(f"{ckpt.name}: {problem}")
        warnings.append(f"checkpoint {ckpt.name} is damaged, falling back to an earlier one: {problem}")
    partials = sorted(p.name for p in root.glob("*.partial"))
    found = (f"{len(order)} checkpoints, all damaged: {'; '.join(damaged)}" if order
             else f"only incomplete saves: {', '.join(partials)}" if partials else "no checkpoint")
    raise CheckpointError(f"--resume {where}: no intact checkpoint in {root} ({found}); check the path, "
                          "or start again without --resume")


def _saved(ckpt: Path) -> dict:
    return json.loads((ckpt / "rosa_state.json").read_text())


def check_compatible(choice: Choice, now: dict) -> None:
    """What a resume must match, from the files alone, in one error naming the flags.

    ``now``: ``world_size``, ``zero_stage``, ``method``, ``rank`` (the adapter rank) and
    ``quantize_base`` of this run.
    The saving run's method and rank come from its ``config.json`` beside ``checkpoints/`` when
    present; a ROSA checkpoint's own ``rosa_state.json`` holds its rank in any case."""
    saved, problems = choice.saved, []
    if saved.get("world_size") != now["world_size"]:
        problems.append(f"it was saved by {saved.get('world_size')} ranks, this run has {now['world_size']} "
                        "(launch as many ranks as the saving run)")
    if saved.get("zero_stage") != now["zero_stage"]:
        problems.append(f"it was saved with ZeRO stage {saved.get('zero_stage')}, this run uses {now['zero_stage']} "
                        "(use the saving run's --deepspeed config)")
    run = _run_config(choice.path)
    method = run.get("method") or ("rosa" if saved.get("rosa_config") else None)
    if method is not None and method != now["method"]:
        problems.append(f"it was saved with --method {method}, this run has --method {now['method']}")
    rank = (saved.get("rosa_config") or {}).get("rank") if method == "rosa" else run.get("rank")
    if method == now["method"] and method in ("rosa", "lora") and rank is not None and rank != now["rank"]:
        problems.append(f"it was saved with --rank {rank}, this run has --rank {now['rank']} (use --rank {rank})")
    quantized = (saved.get("rosa_config") or {}).get("quantize_base", now["quantize_base"])
    if method == now["method"] == "rosa" and quantized != now["quantize_base"]:
        def flag(value):
            return f"--quantize-base {value}" if value else "no --quantize-base"
        problems.append(f"it was saved with {flag(quantized)}, this run has {flag(now['quantize_base'])}")
    if problems:
        raise CheckpointError(f"--resume: cannot continue from {choice.path}: " + "; ".join(problems)
                              + "; or start a new run without --resume")


def _run_config(ckpt: Path) -> dict:
    """The saving run's ``config.json`` (``<output-dir>/checkpoints/<tag>`` -> ``<output-dir>``), or {}."""
    try:
        data = json.loads((ckpt.parent.parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
