"""Faults on real CLI runs (2 CPU ranks, the DeepSpeed launcher): damaged checkpoints and a full disk.

One trained output is shared (``trained``: 14 steps, a resample at step 7, checkpoints at steps 12
and 14 kept); each case copies it and damages the copy. The reference for every resumed loss is
that uninterrupted run's loss of the same step.
"""
import hashlib
import json
import os
import shutil

import pytest

from rosa_ds.ds.verify import checkpoint_damage
from tests.helpers.launch import ROOT, launch_cli, metrics_records

SHIM = ROOT / "tests" / "helpers" / "enospc"  # sitecustomize: ENOSPC after N bytes under a directory
LOADED = "[rosa_ds] loaded "  # logged once the model's weights are loaded (rosa_ds.recipe.models)
STEP12, STEP14 = "step_00000012", "step_00000014"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers.assets import tiny_causal_run

    return tiny_causal_run(tmp_path_factory.mktemp("assets"))


def args(assets):
    return ["--model", str(assets / "llama"), "--dataset", str(assets / "data.jsonl"), "--method", "rosa",
            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--seq-len", "48", "--micro-batch", "4",
            "--epochs", "2", "--lr", "3e-3", "--rank", "4", "--max-eval-samples", "8", "--num-samples", "1",
            "--save-every", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets):
    """The uninterrupted run: 7 steps per epoch, saves at 3, 6, 7, 9, 12, 14; 12 and 14 kept."""
    out = tmp_path_factory.mktemp("faults") / "trained"
    launch_cli(args(assets), out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [STEP12, STEP14]
    return out


def losses(out):
    return {r["step"]: r["loss"] for r in metrics_records(out) if "loss" in r}


def error_line(proc) -> str:
    text = proc.stdout + proc.stderr
    assert "rosa_ds: error:" in text, text[-3000:]
    return text[text.index("rosa_ds: error:"):].split("\n")[0]


def rewrite(ckpt, name, data: bytes):
    """Replace one file of a checkpoint and fix its manifest (size and sha256): a consistent file."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"][name], manifest["sha256"][name] = len(data), hashlib.sha256(data).hexdigest()
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))


def damage_newer_copies(ckpts):
    """Newer copies of step 14, each damaged one way, a truncated step 14 and a garbage ``latest``.
    Returns (checkpoint, the file its warning must name) in the order a resume meets them."""
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    copies = {n: ckpts / f"step_{n:08d}" for n in (15, 16, 17, 18)}
    for path in copies.values():
        shutil.copytree(ckpts / STEP14, path)
    data = bytearray((copies[15] / shard).read_bytes())  # same size, a few bytes inverted mid-file
    data[len(data) // 2: len(data) // 2 + 4] = bytes(255 - b for b in data[len(data) // 2: len(data) // 2 + 4])
    (copies[15] / shard).write_bytes(bytes(data))
    (copies[16] / "rosa_state.json").unlink()
    (copies[17] / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    # step 18 names a frozen record whose shard is truncated (the checkpoint's own files are consistent)
    state = json.loads((copies[18] / "rosa_state.json").read_text())
    record = ckpts / "frozen" / state["frozen"]
    broken = record.with_name("broken-0001")
    shutil.copytree(record, broken)
    shard_file = sorted(broken.glob("*.safetensors"))[0]
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    rewrite(copies[18], "rosa_state.json", json.dumps({**state, "frozen": broken.name}).encode())
    model_states = ckpts / STEP14 / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00\x81garbage")
    return [(ckpts / "latest", "latest is not text"),
            (copies[18], f"{broken.name}/{shard_file.name} is truncated (100 of"),
            (copies[17], "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"),
            (copies[16], "rosa_state.json is missing"), (copies[15], f"{shard} is corrupted"),
            (ckpts / STEP14, "mp_rank_00_model_states.pt is truncated (1000 of")]


def test_damaged_checkpoints_fall_back_then_a_full_disk_stops_cleanly(tmp_path, assets, trained, monkeypatch):
    """One resumed launch: every damaged checkpoint is passed over with a warning naming the file,
    before the weights load; the run continues from step 12 with the uninterrupted run's losses
    bit for bit and metrics.jsonl holds each step once. Its next save then meets a full disk on
    rank 1 (injected ENOSPC after 10 kB): one line naming the path and the space, every rank
    stops, no .partial is left and step 12 is still intact."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("final_model"))
    ckpts = out / "checkpoints"
    expected = damage_newer_copies(ckpts)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("ROSA_DS_TEST_ENOSPC", f"{ckpts}:10000:1")
    proc = launch_cli(args(assets) + ["--resume"], out, check=False)
    log = proc.stderr
    assert proc.returncode != 0, log[-3000:]
    # the fallback: one warning per damaged thing, naming it, in order, all before the weights load
    assert LOADED in log, log[-3000:]
    loaded_at = log.index(LOADED)
    at = 0
    for path, words in expected:
        line = next((ln for ln in log[at:].splitlines() if path.name in ln and words in ln), None)
        assert line is not None, (path, words, [ln for ln in log[:loaded_at].splitlines() if "rosa_ds" in ln])
        at = log.index(line, at)
        assert at < loaded_at
    assert log.index(f"resuming from {ckpts / STEP12}") < loaded_at
    # recomputed steps equal the uninterrupted run's, and each step is in metrics.jsonl once
    recs = metrics_records(out)
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 15)), steps
    assert losses(out) == losses(trained)
    assert [r["step"] for r in recs if r.get("event") == "checkpoint"] == [3, 6, 7, 9, 12]
    # the full disk: one line naming the path and the space; nothing half-written left behind
    line = error_line(proc)
    assert f"checkpoint {ckpts / STEP14} could not be saved: no space left on device writing" in line, line
    assert f"{STEP14}.partial/" in line and "on rank 1" in line and "are free" in line, line
    assert "the size of the previous checkpoint step_00000012" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list(ckpts.rglob("*.partial")), list(ckpts.rglob("*.partial"))
    assert checkpoint_damage(ckpts / STEP12) is None


def test_explicit_resume_of_a_damaged_checkpoint_is_one_line_before_weights_load(tmp_path, assets, trained):
    """``--resume PATH`` names one checkpoint: damaged, it is an error naming the file (no fallback)."""
    out = tmp_path / "run"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("final_model"))
    ckpt = out / "checkpoints" / STEP14
    data = bytearray((ckpt / "mp_rank_00_model_states.pt").read_bytes())
    data[-100] ^= 0xFF  # same size
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_text()
    proc = launch_cli(args(assets) + ["--resume", str(ckpt)], out, check=False)
    assert proc.returncode != 0
    line = error_line(proc)
    assert f"--resume {ckpt}: the checkpoint is damaged: {ckpt / 'mp_rank_00_model_states.pt'} is corrupted" in line
    assert LOADED not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before
