"""``load_data``: config + tokenizer -> TokenizedData, with an on-disk cache of the tokenization.

Cache policy (safe for several ranks launched at once): the entry's name is a hash of the
tokenizer's full definition, the data config and the source files' identity (path, size,
mtime). Under an exclusive file lock, the first rank to arrive tokenizes and writes the entry
atomically; ranks that arrive meanwhile wait on the lock and then just load it. Every rank thus
ends with byte-identical data, built once per machine.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ...utils.io import atomic_file, cache_root, exclusive, stable_hash
from ...utils.log import log_rank0, log_this_rank
from .config import DataConfig, DataError
from .encode import (
    EvalPrompt,
    TokenizedSplit,
    encode_classification,
    encode_prompt_target,
    encode_text,
    eval_prompts,
    special_prefix,
)
from .encode_chat import chat_eval_prompts, chat_template, encode_chat
from .prepare import Example, RawData, check_data

FORMAT_VERSION = 2  # bump when the encoding changes, to invalidate old cache entries


@dataclass
class TokenizedData:
    """What the trainer consumes. ``eval`` is None without an eval split; ``label_names`` is set for
    classification (sorted, from the training split; class id = index); ``mode`` is
    prompt_target | text | chat | classification."""

    train: TokenizedSplit
    eval: Optional[TokenizedSplit]
    label_names: Optional[list[str]] = None
    eval_prompts: list[EvalPrompt] = field(default_factory=list)
    mode: str = "prompt_target"
    stats: dict = field(default_factory=dict)
    cache_path: Optional[Path] = None
    from_cache: bool = False


def _backend_json(backend) -> str:
    """The backend tokenizer's JSON without per-call state: a call with truncation=True leaves
    truncation set on the backend, which must not change the fingerprint. State is restored."""
    trunc, pad = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if trunc:
            backend.enable_truncation(**trunc)
        if pad:
            backend.enable_padding(**pad)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizer) and special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = _backend_json(backend) if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    meta = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
            special_prefix(tokenizer)]
    return hashlib.sha256((body + json.dumps(meta)).encode()).hexdigest()


def cache_path_for(raw: RawData, tokenizer) -> Optional[Path]:
    cfg = raw.cfg
    if cfg.cache_dir == "":
        return None
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "data"
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("cache_dir", "pack")}  # packing: at load
    template = chat_template(tokenizer, cfg) if raw.fields.mode == "chat" else None
    key = stable_hash([FORMAT_VERSION, tokenizer_fingerprint(tokenizer), settings, raw.identity, template], 20)
    stem = Path(str(cfg.dataset)).stem.replace("/", "_")[:40]
    return root / f"{stem}-{key}.pt"


def _encode(tokenizer, examples: list[Example], raw: RawData):
    """(input_ids, labels, n_truncated, dropped locations) of ``examples``."""
    cfg, mode = raw.cfg, raw.fields.mode
    if mode == "chat":
        return encode_chat(tokenizer, examples, cfg)
    return (*_encode_fields(tokenizer, examples, raw), [])


def _encode_fields(tokenizer, examples: list[Example], raw: RawData):
    cfg, mode = raw.cfg, raw.fields.mode
    if mode == "prompt_target":
        return encode_prompt_target(tokenizer, examples, cfg.seq_len, cfg.prompt_truncation)
    if mode == "text":
        return encode_text(tokenizer, examples, cfg.seq_len)
    return encode_classification(tokenizer, examples, cfg.seq_len, raw.label_names)


def build(raw: RawData, tokenizer) -> TokenizedData:
    """Tokenize ``raw`` (no cache)."""
    cfg = raw.cfg
    tr_ids, tr_labels, tr_cut, tr_dropped = _encode(tokenizer, raw.train, raw)
    if not tr_ids:
        raise DataError(f"every training conversation lost its assistant tokens to --seq-len {cfg.seq_len} (first: "
                        f"{tr_dropped[0]}); raise --seq-len")
    train = TokenizedSplit.from_lists(tr_ids, tr_labels)
    ev = None
    stats = {"train_samples": len(train), "train_tokens": int(train.lengths().sum()), "train_truncated": tr_cut,
             "max_len": int(train.lengths().max()), "train_dropped": len(tr_dropped)}
    if raw.eval:
        ev_ids, ev_labels, ev_cut, ev_dropped = _encode(tokenizer, raw.eval, raw)
        ev = TokenizedSplit.from_lists(ev_ids, ev_labels)
        stats.update(eval_samples=len(ev), eval_tokens=int(ev.lengths().sum()), eval_truncated=ev_cut,
                     eval_dropped=len(ev_dropped))
    if train.per_token:
        stats["train_loss_tokens"] = int((train.labels != -100).sum())
    held_out = raw.eval[:cfg.num_samples]
    if raw.fields.mode == "chat":
        prompts = chat_eval_prompts(tokenizer, held_out, cfg, chat_template(tokenizer, cfg))
    else:
        prompts = eval_prompts(tokenizer, held_out, raw.fields.mode, cfg.seq_len, cfg.prompt_truncation)
    return TokenizedData(train, ev, raw.label_names, prompts, raw.fields.mode, stats)


def _save(data: TokenizedData, path: Path) -> None:
    blob = {"train": data.train.state(), "eval": data.eval.state() if data.eval is not None else None,
            "label_names": data.label_names, "eval_prompts": [asdict(p) for p in data.eval_prompts],
            "mode": data.mode, "stats": data.stats, "format": FORMAT_VERSION}
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)


def _load(path: Path) -> TokenizedData:
    blob = torch.load(path, weights_only=True)
    ev = TokenizedSplit.from_state(blob["eval"]) if blob["eval"] is not None else None
    return TokenizedData(TokenizedSplit.from_state(blob["train"]), ev, blob["label_names"],
                         [EvalPrompt(**p) for p in blob["eval_prompts"]], blob["mode"], blob["stats"],
                         cache_path=path, from_cache=True)


def tokenize_data(raw: RawData, tokenizer) -> TokenizedData:
    """Tokenized train/eval splits of ``raw``, from the cache when an identical entry exists."""
    path = cache_path_for(raw, tokenizer)
    if path is None:
        return build(raw, tokenizer)
    with exclusive(path):
        if path.exists():
            try:
                return _load(path)
            except Exception as exc:  # unreadable entry (e.g. written by another torch): rebuild it
                log_this_rank(f"tokenized cache {path} unreadable ({exc}); rebuilding", logging.WARNING)
        data = build(raw, tokenizer)
        _save(data, path)
    data.cache_path = path
    log_rank0(f"tokenized {raw.cfg.dataset}: {data.stats} (cached at {path})")
    return data


def load_data(cfg: DataConfig, tokenizer) -> TokenizedData:
    """Read, validate, split and tokenize the data of ``cfg`` (call ``check_data`` first to fail early)."""
    return tokenize_data(check_data(cfg), tokenizer)
