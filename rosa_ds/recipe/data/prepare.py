"""From raw records to validated examples, split and labelled: everything that needs no tokenizer.

``check_data`` is cheap (the built-in corpus reads in well under a second), so a launcher can call
it before loading any model and fail on bad data with one line naming file, line and field.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

from .config import DataConfig, DataError
from .sources import Record, read_source

FLAGS = {"prompt": "--prompt-field", "target": "--target-field", "text": "--text-field",
         "text_pair": "--text-pair-field", "label": "--label-field", "messages": "--messages-field"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Fields:
    """Which record field plays which role. ``mode``: prompt_target | text | chat | classification."""

    mode: str
    names: dict  # role -> field name, e.g. {"prompt": "prompt", "target": "target"}


@dataclass
class Example:
    loc: str     # "data.jsonl:7", for error messages
    values: dict  # role -> str, e.g. {"prompt": "...", "target": "..."}; chat: {"messages": [{role, content}]}


@dataclass
class RawData:
    """Validated, split examples; ``label_names`` is set for classification (sorted, from train)."""

    cfg: DataConfig
    fields: Fields
    train: list[Example]
    eval: list[Example]
    label_names: Optional[list[str]] = None
    identity: dict = field(default_factory=dict)


def resolve_fields(cfg: DataConfig, first: Record) -> Fields:
    """Field roles from the config, or for causal LM guessed from the first record's keys."""
    if cfg.task == "classification":
        names = {"text": cfg.text_field or "text", "label": cfg.label_field or "label"}
        if cfg.text_pair_field:
            names["text_pair"] = cfg.text_pair_field
        return Fields("classification", names)
    if cfg.is_chat:
        return Fields("chat", {"messages": cfg.messages_field or "messages"})
    if cfg.text_field:
        return Fields("text", {"text": cfg.text_field})
    if cfg.prompt_field or cfg.target_field or "prompt" in first.fields:
        return Fields("prompt_target", {"prompt": cfg.prompt_field or "prompt", "target": cfg.target_field or "target"})
    if "text" in first.fields:
        return Fields("text", {"text": "text"})
    if "messages" in first.fields:
        return Fields("chat", {"messages": "messages"})
    keys = ", ".join(sorted(map(str, first.fields)))
    raise DataError(f"{first.loc}: record has neither 'prompt', 'text' nor 'messages' (fields: {keys}); "
                    "set --prompt-field/--target-field, --text-field or --messages-field")


def _value(rec: Record, role: str, name: str) -> str:
    if name not in rec.fields:
        keys = ", ".join(sorted(map(str, rec.fields)))
        raise DataError(f"{rec.loc}: record has no field {name!r} (fields: {keys}); set {FLAGS[role]}")
    value = rec.fields[name]
    if role == "messages":
        return check_messages(value, rec.loc, name)
    if role == "label":
        if isinstance(value, (dict, list)):
            raise DataError(f"{rec.loc}: field {name!r} is a {type(value).__name__}, expected a class name or number")
        value = "" if value is None else str(value)
    elif value is not None and not isinstance(value, str):
        raise DataError(f"{rec.loc}: field {name!r} is a {type(value).__name__}, expected text; "
                        f"fix the record or set {FLAGS[role]}")
    if not value or not value.strip():
        raise DataError(f"{rec.loc}: field {name!r} is empty; every record needs a non-empty {role}")
    return value


def check_messages(value, loc: str, name: str) -> list[dict]:
    """A conversation as a list of ``{"role", "content"}`` with known roles and an assistant turn."""
    fix = "fix the record or set --messages-field"
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise DataError(f"{loc}: field {name!r} is {kind}, expected a list of {{role, content}} messages; {fix}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{loc}: message {i} of {name!r} is not a {{role, content}} object with text values "
                            f"(got {str(m)[:60]!r}); {fix}")
        if m["role"] not in ROLES:
            raise DataError(f"{loc}: message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise DataError(f"{loc}: conversation has no non-empty assistant turn, so nothing to learn; add one "
                        "or remove the record")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_examples(records: list[Record], fields: Fields) -> list[Example]:
    return [Example(r.loc, {role: _value(r, role, name) for role, name in fields.names.items()}) for r in records]


def seeded_order(keys: list[str], seed: int) -> list[int]:
    """Indices sorted by sha256(seed:key): a permutation identical on every process and machine."""
    return sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())


def split_indices(keys: list[str], eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices, each in seeded order; eval has round(n * eval_fraction) items (>= 1 if > 0)."""
    order = seeded_order(keys, seed)
    n = len(order)
    n_eval = 0 if eval_fraction <= 0 else min(n - 1, max(1, round(n * eval_fraction)))
    return order[n_eval:], order[:n_eval]


def _label_key(name: str):
    """Numeric labels sort as numbers (so ids 0..K-1 keep their values), others alphabetically."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def check_labels(cfg: DataConfig, train: list[Example], eval_: list[Example]) -> list[str]:
    names = sorted({ex.values["label"] for ex in train}, key=_label_key)
    if len(names) < 2:
        raise DataError(f"only one class ({names[0]!r}) in the training split of {cfg.dataset}; classification "
                        "needs at least 2 (check --label-field, or raise --max-train-samples)")
    known = set(names)
    for ex in eval_:
        if ex.values["label"] not in known:
            raise DataError(f"{ex.loc}: label {ex.values['label']!r} is in the eval split but not in the training "
                            f"split (classes: {', '.join(names)}); add training examples of it or fix the label")
    return names


def check_data(cfg: DataConfig) -> RawData:
    """Read, validate and split the data (no tokenizer, no model): raises DataError on bad input."""
    source = read_source(cfg.dataset, cfg.split, cfg.chat)
    fields = resolve_fields(cfg, source.records[0])
    if cfg.chat_template and fields.mode != "chat":
        raise DataError(f"--chat-template applies to conversations, but {cfg.dataset} is read as {fields.mode} "
                        "records; set --messages-field FIELD (or --chat) or drop --chat-template")
    examples = to_examples(source.records, fields)
    identity = {"train": source.identity}
    if cfg.eval_dataset is not None:
        ev_source = read_source(cfg.eval_dataset, cfg.split)
        ev_examples = to_examples(ev_source.records, fields)
        train = [examples[i] for i in seeded_order([r.key for r in source.records], cfg.seed)]
        eval_ = [ev_examples[i] for i in seeded_order([r.key for r in ev_source.records], cfg.seed)]
        identity["eval"] = ev_source.identity
    else:
        tr_idx, ev_idx = split_indices([r.key for r in source.records], cfg.eval_fraction, cfg.seed)
        train, eval_ = [examples[i] for i in tr_idx], [examples[i] for i in ev_idx]
    train = train[:cfg.max_train_samples] if cfg.max_train_samples else train
    eval_ = eval_[:cfg.max_eval_samples] if cfg.max_eval_samples else eval_
    labels = check_labels(cfg, train, eval_) if fields.mode == "classification" else None
    return RawData(cfg, fields, train, eval_, labels, identity)
