"""Which checkpoint a resume loads, decided from the files alone, before any weight loads.

``choose`` runs in the recipe's ``check`` on every rank independently (no process group exists yet);
it reads only the files, so every rank chooses the same checkpoint. A checkpoint is intact when
its ``COMPLETE`` manifest lists files that are all there with their sizes and sha256, its
``rosa_state.json`` reads, and the frozen record it names is intact the same way
(``rosa_ds.utils.manifest.damage``).

    --resume of a checkpoints dir (or of an output dir, or the bare flag): ``latest`` first, then
        the older ``step_*`` checkpoints, newest first; every damaged one is passed over with a
        warning naming the file; a garbage ``latest`` (empty, not text, naming no checkpoint) is
        named and ignored, and the ``step_*`` directories are scanned instead.
    --resume of one checkpoint: it must be intact, or the error names the damaged file.

``check_choice`` then compares what the checkpoint was saved with and this run, by config field
(``compare``: the one resume check; ``rosa_ds.ds.checkpoint.load`` runs it again with the model's
target layers): a difference that must match is refused, a schedule change is returned.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import config_field
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
    where, resume = Path(where), config_field("resume")
    if not where.is_dir():
        raise CheckpointError(f"{resume} {where}: no such directory; give a checkpoint or a checkpoints directory")
    root = container(where)
    if root is None:
        problem = checkpoint_damage(where)
        if problem:
            raise CheckpointError(f"{resume} {where}: the checkpoint is damaged: {problem}; resume from another "
                                  "checkpoint (or its checkpoints directory, which skips damaged ones) or start "
                                  f"again without {resume}")
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
    raise CheckpointError(f"{resume} {where}: no intact checkpoint in {root} ({found}); check the path, "
                          f"or start again without {resume}")


def _saved(ckpt: Path) -> dict:
    return json.loads((ckpt / "rosa_state.json").read_text())


# What a resume must match: the saved state's layout (format, ranks, ZeRO stage, method, adapter rank,
# quantized base, target layers) and the step <-> sample mapping (a resumed step N must train the
# samples the saving run's step N would have: batch sizes, ranks, the data, sequence length,
# packing). The schedule may change (the LR scheduler continues from its saved state), with a notice.
MUST_MATCH = ("format", "world_size", "zero_stage", "method", "rank", "quantize_base", "layers",
              "micro_batch", "grad_accum", "data", "seq_len", "pack")
MAY_CHANGE = ("lr", "warmup", "epochs", "max_steps", "weight_decay")
# The facts the trainer records with each checkpoint (``client_state["plan"]``), by config field.
PLAN = ("method", "rank", *MUST_MATCH[7:], *MAY_CHANGE)


@dataclass(frozen=True)
class Difference:
    """One fact, by config field name, as the checkpoint was saved and as this run has it."""

    field: str
    saved: Any
    now: Any


class ResumeMismatch(CheckpointError):
    """A resume that would change what must match; ``differences`` name config fields (the recipe
    words them as its flags)."""

    def __init__(self, ckpt: Path, differences: list[Difference]) -> None:
        self.ckpt, self.differences = ckpt, differences
        super().__init__(f"cannot resume from {ckpt}: " + "; ".join(
            f"{d.field}: checkpoint {_short(d)}, this run {_short(d, now=True)}" for d in differences)
            + ". Resume with the same settings and number of ranks, or start a new run")


def _short(d: Difference, now: bool = False) -> Any:
    value = d.now if now else d.saved
    if d.field != "layers":
        return value
    mine, other = {l[0] for l in value or []}, {l[0] for l in (d.saved if now else d.now) or []}
    return f"{len(value or [])} layers (only here: {sorted(mine - other)[:5]})"


def saved_facts(saved: dict, run_config: Optional[dict] = None) -> dict:
    """The facts a checkpoint was saved with, by config field: its ``rosa_state.json`` (layout,
    and the plan the trainer recorded in its client state); ``run_config`` (the saving run's
    ``config.json``) gives the method and adapter rank of a checkpoint that has no plan."""
    run = run_config or {}
    facts = {k: run[k] for k in ("method", "rank") if k in run and run.get("method") in ("rosa", "lora")}
    facts.update(module_facts(saved))
    facts.update({k: v for k, v in ((saved.get("client_state") or {}).get("plan") or {}).items() if k in PLAN})
    return facts


def module_facts(described: dict) -> dict:
    """Facts from a ``describe``-shaped dict (``rosa_ds.ds.checkpoint.describe``): world size, ZeRO
    stage, the ROSA config's rank and quantized base, the target layers, the format if given."""
    facts = {k: described[k] for k in ("format", "world_size", "zero_stage") if k in described}
    rosa = described.get("rosa_config")
    if rosa:
        facts.update(method="rosa", rank=rosa.get("rank"), quantize_base=rosa.get("quantize_base"))
    if "layers" in described:
        facts["layers"] = [list(l) for l in described["layers"]]
    return facts


def compare(saved: dict, now: dict) -> tuple[list[Difference], list[Difference]]:
    """(refused, noticed): the facts known on both sides that differ, those that must match and
    those that may change (``MUST_MATCH``, ``MAY_CHANGE``)."""
    differ = [Difference(k, saved[k], now[k]) for k in saved.keys() & now.keys() if saved[k] != now[k]]
    order = {k: i for i, k in enumerate(MUST_MATCH + MAY_CHANGE)}
    differ.sort(key=lambda d: order.get(d.field, len(order)))
    return [d for d in differ if d.field in MUST_MATCH], [d for d in differ if d.field in MAY_CHANGE]


def check_choice(choice: Choice, now: dict) -> list[Difference]:
    """The one resume check, from the files alone: raises ``ResumeMismatch`` listing every
    difference that must not be, returns the schedule changes (``compare``)."""
    refused, noticed = compare(saved_facts(choice.saved, _run_config(choice.path)), now)
    if refused:
        raise ResumeMismatch(choice.path, refused)
    return noticed


def _run_config(ckpt: Path) -> dict:
    """The saving run's ``config.json`` (``<output-dir>/checkpoints/<tag>`` -> ``<output-dir>``), or {}."""
    try:
        data = json.loads((ckpt.parent.parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
