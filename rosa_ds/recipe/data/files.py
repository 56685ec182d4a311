"""Local data on disk: single files, folders of shards and ``datasets.save_to_disk`` directories.

Every format is read by a real parser: JSON lines are split on ``\\n`` only (the JSON Lines
separator; a raw U+2028 or U+0085 inside a JSON string is valid text, and ``str.splitlines``
would cut the record there), CSV by the standard ``csv`` module on a file opened with
``newline=''`` (quoted fields may hold any character, newlines included), Parquet and Arrow by
pyarrow. Records keep ``file:line`` (or ``file: row N``) locations for error messages.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .config import DataError
from .record import Record, Source

SHARD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"file": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime_ns}


def read_path(spec: str, split: str) -> Source:
    """Records of a local file, a shard folder or a ``save_to_disk`` directory (``split`` picks the part)."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if is_saved_dataset(path):
            return read_saved(path, spec, split)
        return read_shards(path, spec, split)
    if not os.path.isfile(path):
        raise DataError(f"dataset file {spec!r} does not exist; check the path")
    records = read_file_records(path, spec)
    if not records:
        raise DataError(f"{spec}: no records; the file is empty")
    return Source(records, file_identity(path))


def read_file_records(path: str, name: str) -> list[Record]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".arrow": _read_arrow}
    suffix = Path(path).suffix.lower()
    if suffix not in readers:
        raise DataError(f"dataset file {name!r} has an unsupported type; use one of {', '.join(readers)}")
    try:
        return readers[suffix](path, name)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None


def _as_record(obj, loc: str, key: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{loc}: record is a {type(obj).__name__}, expected an object with named fields")
    return Record(loc=loc, key=key, fields=obj)


def _read_jsonl(path: str, name: str) -> list[Record]:
    records = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        # Iterating a file opened with newline="" splits on \n, \r\n and \r only, never on U+2028 & co.
        for lineno, line in enumerate(fh, start=1):
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
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    try:
        obj = json.loads(text)
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
    records = []
    with open(path, encoding="utf-8-sig", newline="") as fh:  # newline="": the csv module's own rule
        reader = csv.DictReader(fh)
        for row in reader:
            # DictReader yields None for cells missing from a short row: treat as absent fields.
            fields = {k: v for k, v in row.items() if k is not None and v is not None}
            records.append(Record(loc=f"{name}:{reader.line_num}", key=f"line{reader.line_num}", fields=fields))
    return records


def _rows(rows: list[dict], name: str) -> list[Record]:
    return [Record(loc=f"{name}: row {i}", key=f"row{i}", fields=r) for i, r in enumerate(rows, start=1)]


def _read_parquet(path: str, name: str) -> list[Record]:
    import pyarrow.parquet as pq

    return _rows(pq.read_table(path).to_pylist(), name)


def _read_arrow(path: str, name: str) -> list[Record]:
    """An Arrow IPC file: the stream format ``datasets`` writes, or the random-access file format."""
    import pyarrow as pa

    try:
        with pa.memory_map(path) as src:
            table = pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(path) as src:
            table = pa.ipc.open_file(src).read_all()
    return _rows(table.to_pylist(), name)


# ---------------------------------------------------------------- folders

def is_saved_dataset(path: str) -> bool:
    """A ``Dataset.save_to_disk`` (state.json) or ``DatasetDict.save_to_disk`` (dataset_dict.json) directory."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def dir_identity(path: str, files: list[str]) -> dict:
    stats = [os.stat(f) for f in files]
    return {"dir": os.path.abspath(path), "files": [os.path.relpath(f, path) for f in files],
            "bytes": sum(s.st_size for s in stats), "mtime": max((s.st_mtime_ns for s in stats), default=0)}


def read_saved(path: str, spec: str, split: str) -> Source:
    """A ``save_to_disk`` directory via ``datasets.load_from_disk``; a DatasetDict gives ``split``."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {spec!r} has no split {split!r} (splits: {', '.join(ds)}); set --split")
        ds, where = ds[split], os.path.join(path, split)
    else:
        where = path
    files = sorted(str(p) for p in Path(where).glob("*") if p.is_file())
    if len(ds) == 0:
        raise DataError(f"{spec}: no records in split {split!r}")
    return Source(_rows(ds.to_list(), f"{spec}[{split}]"), dir_identity(path, files))


def shard_files(path: str, split: str) -> list[str]:
    """Data files of a shard folder: those of the ``split`` subfolder if there is one, else the files
    named after the split (``train-00000-of-00002.parquet``, ``train.jsonl``), else all of them."""
    root = Path(path)
    if (root / split).is_dir():
        root = root / split
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES)
    named = [p for p in files if p.name.startswith((f"{split}-", f"{split}.", f"{split}_"))]
    return [str(p) for p in (named or files)]


def read_shards(path: str, spec: str, split: str) -> Source:
    files = shard_files(path, split)
    if not files:
        raise DataError(f"dataset folder {spec!r} holds no {', '.join(SHARD_SUFFIXES)} files; give a folder "
                        "of data shards, a datasets.save_to_disk directory or a file")
    kinds = {Path(f).suffix.lower() for f in files}
    if len(kinds) > 1:
        raise DataError(f"dataset folder {spec!r} mixes file types ({', '.join(sorted(kinds))}); keep one type "
                        "per folder (or put each split in its own subfolder and set --split)")
    records = []
    for f in files:
        name = os.path.join(spec, os.path.relpath(f, path))
        for r in read_file_records(f, name):
            records.append(Record(r.loc, f"{os.path.relpath(f, path)}:{r.key}", r.fields))
    if not records:
        raise DataError(f"dataset folder {spec!r}: no records in its {len(files)} files")
    return Source(records, dir_identity(path, files))
