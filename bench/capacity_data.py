"""The capacity suite's data: real text as 128-token LM blocks (BBC article bodies, or the Python
source of sympy), and synthetic facts.

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

Code (``corpus="sympy"``, the second candidate for a capacity-bound task): the library modules of
the sympy package installed beside torch (a dependency of torch, so it ships with every install;
its version is recorded), ``tests/`` and ``benchmarks/`` left out, one document per file, files
with the same text counted once. The files are shuffled with the same seed and cut by count; each
file gives at most ``per_doc`` blocks, evenly spaced through it, so that no long module fills a
split and the held-out splits cover many files.

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
    """Documents held out for validation and test, and training blocks (one pass); ``corpus``:
    "bbc" (documents are articles) or "sympy" (documents are source files); ``per_doc``: the most
    blocks one document gives (None: all)."""

    train_blocks: int
    val_articles: int
    test_articles: int
    corpus: str = "bbc"
    per_doc: Optional[int] = None


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


def spaced(blocks: list[str], most: Optional[int]) -> list[str]:
    """At most ``most`` of ``blocks``, evenly spaced from the first (all of them when None)."""
    if most is None or len(blocks) <= most:
        return blocks
    return [blocks[i * len(blocks) // most] for i in range(most)]


def split_articles(sizes: BlockSizes) -> dict[str, list[str]]:
    """Article keys of test / val / train: whole duplicate groups from the study's seeded shuffle."""
    heads = sorted(read_bbc("bbc-headlines").records, key=lambda r: r.key)
    groups = sorted(duplicate_groups(heads))
    random.Random(SPLIT_SEED).shuffle(groups)
    return _cut(groups, [("test", sizes.test_articles), ("val", sizes.val_articles), ("train", None)])


def sympy_files() -> tuple[str, dict[str, str]]:
    """(sympy's version, {path relative to the package: text}) of its library modules, tests and
    benchmarks left out, one path per distinct text (the first in sorted order)."""
    import sympy

    root, out, seen = Path(sympy.__file__).parent, {}, set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        text = path.read_text(encoding="utf-8")
        if {"tests", "benchmarks"} & set(rel.parts) or not text.strip() or text in seen:
            continue
        seen.add(text)
        out[str(rel)] = text
    return sympy.__version__, out


def documents(sizes: BlockSizes) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """{split: [(key, text)]} in the shuffled order, and what names the corpus in the description."""
    if sizes.corpus == "bbc":
        return {part: [(key, "\n\n".join(read_article(bbc_dir() / key)[1])) for key in keys]
                for part, keys in split_articles(sizes).items()}, {}
    if sizes.corpus != "sympy":
        raise SystemExit(f"capacity: unknown corpus {sizes.corpus!r}; fix: bbc or sympy")
    version, files = sympy_files()
    keys = sorted(files)
    random.Random(SPLIT_SEED).shuffle(keys)
    cut = _cut([[k] for k in keys], [("test", sizes.test_articles), ("val", sizes.val_articles), ("train", None)])
    return ({part: [(k, files[k]) for k in ks] for part, ks in cut.items()},
            {"corpus": f"sympy {version} library modules", "per_doc": sizes.per_doc})


def write_blocks(sizes: BlockSizes, out: Path, model: str = "default") -> dict:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (field ``text``) under ``out``; returns
    a description (documents, blocks, dropped blocks, sha256 of each file)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    docs, named = documents(sizes)
    unit = "articles" if sizes.corpus == "bbc" else "files"
    desc: dict = {"split_seed": SPLIT_SEED, "block_tokens": BLOCK, "model": model, **named}
    for part, items in docs.items():
        rows, used, dropped = [], 0, 0
        for key, body in items:
            if part == "train" and len(rows) >= sizes.train_blocks:
                break
            blocks, bad = article_blocks(tokenizer, body)
            rows += [{"key": key, "text": t} for t in spaced(blocks, sizes.per_doc)]
            used, dropped = used + 1, dropped + bad
        if part == "train" and len(rows) < sizes.train_blocks:
            raise SystemExit(f"capacity: the training {unit} give {len(rows):,} blocks, fewer than the "
                             f"{sizes.train_blocks:,} asked; fix: lower train_blocks or hold out fewer {unit}")
        if part == "train":
            rows = rows[:sizes.train_blocks]
        desc[part] = {unit: used, "blocks": len(rows), "dropped_blocks": dropped,
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
