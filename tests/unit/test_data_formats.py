"""Data on disk as users keep it: CSV/JSONL with Unicode line separators inside fields, shard
folders, ``datasets.save_to_disk`` directories and their splits."""
import csv
import json

import pytest

from rosa_ds.recipe.data import DataConfig, DataError, check_data

# Characters str.splitlines() treats as line ends; real text carries them inside fields.
SEPARATORS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def texts():
    return [f"review{i} says{sep}more after it" for i, sep in enumerate(SEPARATORS)]


def test_csv_fields_keep_every_separator_and_line_numbers(tmp_path):
    p = tmp_path / "reviews.csv"
    with open(p, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i, t in enumerate(texts()):
            w.writerow([t, "pos" if i % 2 else "neg"])
        w.writerow(["a quoted field\nspanning two lines", "pos"])
    raw = check_data(DataConfig(task="classification", dataset=str(p), eval_fraction=0))
    got = {e.values["text"]: (e.values["label"], e.loc) for e in raw.train}
    for i, t in enumerate(texts()):
        assert got[t] == ("pos" if i % 2 else "neg", f"{p}:{i + 2}")  # intact, and its file:line
    assert got["a quoted field\nspanning two lines"][1] == f"{p}:{len(SEPARATORS) + 3}"  # line where it ends


def test_jsonl_raw_separators_load_intact_and_errors_keep_line(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": t, "target": f"t{i}\u2028x"} for i, t in enumerate(texts())]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # raw, not escaped (JSON itself must escape control characters, so \x0b-\x1e appear as \u000b etc.)
    assert all(s in body for s in SEPARATORS if ord(s) >= 0x20)
    p.write_text(body, encoding="utf-8")
    raw = check_data(DataConfig(dataset=str(p), eval_fraction=0))
    assert sorted((e.values["prompt"], e.values["target"]) for e in raw.train) == \
        sorted((r["prompt"], r["target"]) for r in rows)
    p.write_text(body + '{"prompt": "a\u2028b", "target": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{p}:{len(rows) + 1}: not valid JSON"):
        check_data(DataConfig(dataset=str(p)))


def _write_shards(folder, split, rows, n):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        part = rows[k::n]
        (folder / f"{split}-{k:05d}-of-{n:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def test_shard_folder_by_split_name_and_subfolder(tmp_path):
    rows = [{"prompt": f"p{i}", "target": f"t{i}"} for i in range(12)]
    _write_shards(tmp_path / "flat", "train", rows, 3)
    _write_shards(tmp_path / "flat", "test", rows[:4], 1)
    raw = check_data(DataConfig(dataset=str(tmp_path / "flat"), eval_fraction=0))
    assert sorted(e.values["target"] for e in raw.train) == sorted(r["target"] for r in rows)
    assert raw.train[0].loc.startswith(str(tmp_path / "flat" / "train-"))
    raw = check_data(DataConfig(dataset=str(tmp_path / "flat"), split="test", eval_fraction=0))
    assert sorted(e.values["target"] for e in raw.train) == ["t0", "t1", "t2", "t3"]
    _write_shards(tmp_path / "nested" / "validation", "part", rows[:5], 2)
    raw = check_data(DataConfig(dataset=str(tmp_path / "nested"), split="validation", eval_fraction=0))
    assert len(raw.train) == 5
    (tmp_path / "flat" / "extra.csv").write_text("prompt,target\na,b\n")
    with pytest.raises(DataError, match=r"mixes file types \(.csv, .jsonl\); keep one type per folder"):
        check_data(DataConfig(dataset=str(tmp_path / "flat"), split="other"))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "target": f"t{i}\u2029"} for i in range(10)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    raw = check_data(DataConfig(dataset=str(tmp_path / "one"), eval_fraction=0))
    assert sorted(e.values["target"] for e in raw.train) == sorted(r["target"] for r in rows)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    raw = check_data(DataConfig(dataset=str(tmp_path / "dict"), split="validation", eval_fraction=0))
    assert len(raw.train) == 3 and raw.train[0].loc.startswith(f"{tmp_path / 'dict'}[validation]: row ")
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: train, validation\); set --split"):
        check_data(DataConfig(dataset=str(tmp_path / "dict"), split="test"))
    # an Arrow shard folder (what save_to_disk writes inside) also reads as shards
    arrow = sorted((tmp_path / "one").glob("*.arrow"))
    (tmp_path / "arrows").mkdir()
    for f in arrow:
        (tmp_path / "arrows" / f.name).write_bytes(f.read_bytes())
    assert len(check_data(DataConfig(dataset=str(tmp_path / "arrows"), eval_fraction=0)).train) == 10
