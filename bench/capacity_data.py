"""The capacity suite's data: BBC article bodies as 128-token LM blocks, and synthetic facts.

Blocks (``write_blocks``): the study's split of whole BBC articles (``bench.study``: a seeded
shuffle of duplicate groups, so articles sharing a lead or a headline never cross splits), cut
test / validation / training by article count. Each article body (its paragraphs, blank-line
separated; the headline is left out) is tokenized with the default model's tokenizer and cut into
consecutive blocks of ``BLOCK - 1`` = 127 tokens; the trainer appends EOS (SmolLM2 adds no BOS),
so every row is exactly 128 tokens: no padding, no truncation, loss on every token (plain-text
mode: labels = inputs). An article's tail shorter than a block is dropped, and so is a block whose
decoded text does not re-tokenize to the same 127 ids (BPE merges across the cut: ~0.5% of
blocks), so the trainer sees exactly the tokens counted here. Training takes the first
``train_blocks`` blocks of the training articles in the shuffled order (one pass = those blocks);
``train_blocks`` is the size knob.

Facts (``write_facts``): N synthetic people, each with a random 4-digit locker code:
prompt "The locker code of Kalo Mirenti is", target " 4821." (prompt -> target mode: loss on the
target and EOS only). Names are built from syllables by a seeded generator, unique, and do not
depend on N beyond the first N (fact i is the same for every N), so curves over N nest.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.study import SPLIT_SEED, _cut, _write_jsonl, duplicate_groups
from rosa_ds.recipe.data.sources import bbc_dir, read_article, read_bbc
from rosa_ds.recipe.models import load_tokenizer

BLOCK = 128  # tokens per training row, EOS included
FACT_SEED = 20261207
FACT_PROMPT = "The locker code of {name} is"
SYLLABLES = ("ka", "lo", "mi", "ren", "ti", "sa", "vo", "nel", "da", "ru", "fen", "zi", "mar", "tos", "bel", "qui",
             "ha", "jor", "pe", "lin", "go", "wen", "cas", "dri")


@dataclass(frozen=True)
class BlockSizes:
    """Articles held out for validation and test, and training blocks (one pass)."""

    train_blocks: int
    val_articles: int
    test_articles: int


def article_blocks(tokenizer, body: str, width: int = BLOCK - 1) -> tuple[list[str], int]:
    """(block texts, blocks dropped because they do not re-tokenize to the same ``width`` ids)."""
    ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    out, dropped = [], 0
    for start in range(0, len(ids) - width + 1, width):
        chunk = ids[start:start + width]
        text = tokenizer.decode(chunk)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == chunk:
            out.append(text)
        else:
            dropped += 1
    return out, dropped


def split_articles(sizes: BlockSizes) -> dict[str, list[str]]:
    """Article keys of test / val / train: whole duplicate groups from the study's seeded shuffle."""
    heads = sorted(read_bbc("bbc-headlines").records, key=lambda r: r.key)
    groups = sorted(duplicate_groups(heads))
    random.Random(SPLIT_SEED).shuffle(groups)
    return _cut(groups, [("test", sizes.test_articles), ("val", sizes.val_articles), ("train", None)])


def write_blocks(sizes: BlockSizes, out: Path, model: str = "default") -> dict:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (field ``text``) under ``out``; returns
    a description (articles, blocks, dropped blocks, sha256 of each file)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    desc: dict = {"split_seed": SPLIT_SEED, "block_tokens": BLOCK, "model": model}
    for part, keys in split_articles(sizes).items():
        rows, used, dropped = [], 0, 0
        for key in keys:
            if part == "train" and len(rows) >= sizes.train_blocks:
                break
            _, paragraphs = read_article(bbc_dir() / key)
            blocks, bad = article_blocks(tokenizer, "\n\n".join(paragraphs))
            rows += [{"key": key, "text": t} for t in blocks]
            used, dropped = used + 1, dropped + bad
        if part == "train" and len(rows) < sizes.train_blocks:
            raise SystemExit(f"capacity: the training articles give {len(rows):,} blocks, fewer than the "
                             f"{sizes.train_blocks:,} asked; fix: lower train_blocks or hold out fewer articles")
        if part == "train":
            rows = rows[:sizes.train_blocks]
        desc[part] = {"articles": used, "blocks": len(rows), "dropped_blocks": dropped,
                      "sha256_16": _write_jsonl(out / f"{part}.jsonl", rows)}
    return desc


def fact_names(n: int, seed: int = FACT_SEED) -> list[str]:
    """``n`` unique "First Last" names; the first k are the same for every n ≥ k."""
    rng, names, seen = random.Random(seed), [], set()
    while len(names) < n:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        name = f"{first} {last}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def facts(n: int, seed: int = FACT_SEED) -> list[dict]:
    """``n`` facts as prompt / target rows (target: a space, 4 digits, a full stop)."""
    rng = random.Random(seed + 1)
    codes = [rng.randrange(1000, 10000) for _ in range(n)]
    return [{"prompt": FACT_PROMPT.format(name=name), "target": f" {code}."}
            for name, code in zip(fact_names(n, seed), codes)]


def write_facts(n: int, out: Path) -> dict:
    """``facts_<n>.jsonl`` under ``out`` (the training set, which is also the scored set)."""
    out.mkdir(parents=True, exist_ok=True)
    return {"facts": n, "sha256_16": _write_jsonl(out / f"facts_{n}.jsonl", facts(n))}


def read_jsonl(path: Path, limit: Optional[int] = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows if limit is None else rows[:limit]
