"""Checkpoint integrity from the files alone: manifests with sha256, which checkpoint a resume
loads (fallback past damaged ones, a garbage ``latest``), resume compatibility, the metrics
rewind and the classification of failed writes. Checkpoints here are fabricated directories of
small files with real manifests, so every case runs in milliseconds."""
import errno
import hashlib
import json

import pytest

from rosa_ds.ds.agree import CheckpointError
from rosa_ds.ds.verify import ResumeMismatch, check_choice, checkpoint_damage, choose
from rosa_ds.ds.write_guard import WriteGuard, is_no_space
from rosa_ds.errors import field_words
from rosa_ds.recipe.metrics import rewind
from rosa_ds.recipe.resume import notice, refusal
from rosa_ds.recipe.words import flag_words
from rosa_ds.utils.manifest import damage, listing, share, write_manifest


def publish(directory, files: dict, header=None):
    """Write ``files`` (name -> bytes) and their manifest, as a save does."""
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    sizes = listing(directory)
    write_manifest(directory, header or {}, sizes, {n: hashlib.sha256((directory / n).read_bytes()).hexdigest()
                                                    for n in sizes})


def make_ckpt(root, step, frozen="run-0001", world=2, stage=2, rank=4):
    state = {"format": 2, "world_size": world, "zero_stage": stage, "global_step": step, "frozen": frozen,
             "rosa_config": {"rank": rank, "quantize_base": None}}
    if not (root / "frozen" / frozen).exists():
        publish(root / "frozen" / frozen, {"replicated-00001.safetensors": b"W" * 300})
    ckpt = root / f"step_{step:08d}"
    publish(ckpt, {"rosa_state.json": json.dumps(state).encode(), "optim.pt": bytes(range(256)) * 4,
                   "rosa_rng_rank0.pt": b"r0" * 50})
    (root / "latest").write_text(ckpt.name)
    return ckpt


@pytest.fixture
def ckpts(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    for step in (3, 6, 9):
        make_ckpt(root, step)
    return root


def flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ manifest and damage
@pytest.mark.parametrize("harm, words", [
    (lambda c: (c / "optim.pt").write_bytes((c / "optim.pt").read_bytes()[:100]), "optim.pt is truncated (100 of 1024"),
    (lambda c: flip(c / "optim.pt"), "optim.pt is corrupted (its sha256 differs"),
    (lambda c: (c / "rosa_state.json").unlink(), "rosa_state.json is missing"),
    (lambda c: (c / "COMPLETE").unlink(), "COMPLETE is missing (its save did not finish)"),
    (lambda c: (c / "COMPLETE").write_bytes(b"\x00garbage"), "COMPLETE is not a readable manifest"),
    (lambda c: (c / "optim.pt").write_bytes((c / "optim.pt").read_bytes() + b"x"), "optim.pt is 1025 bytes, not 1024"),
])
def test_each_kind_of_damage_is_found_and_names_the_file(ckpts, harm, words):
    ckpt = ckpts / "step_00000009"
    assert checkpoint_damage(ckpt) is None
    harm(ckpt)
    problem = checkpoint_damage(ckpt)
    assert problem is not None and words in problem and str(ckpt) in problem, problem


def test_a_damaged_frozen_record_damages_its_checkpoints(ckpts):
    flip(ckpts / "frozen" / "run-0001" / "replicated-00001.safetensors", 5)
    for step in (3, 6, 9):
        assert "its frozen record: " in checkpoint_damage(ckpts / f"step_{step:08d}")
        assert "replicated-00001.safetensors is corrupted" in checkpoint_damage(ckpts / f"step_{step:08d}")
    (ckpts / "frozen" / "run-0001" / "COMPLETE").unlink()
    assert "run-0001/COMPLETE is missing" in checkpoint_damage(ckpts / "step_00000003")


def test_a_manifest_without_digests_is_checked_by_size(tmp_path):
    """Checkpoints written before the digests: sizes only, as before."""
    d = tmp_path / "old"
    d.mkdir()
    (d / "a.pt").write_bytes(b"abc")
    (d / "COMPLETE").write_text(json.dumps({"tag": "old", "files": {"a.pt": 3}}))
    flip(d / "a.pt", 0)
    assert damage(d) is None
    (d / "a.pt").write_bytes(b"ab")
    assert "a.pt is truncated (2 of 3 bytes)" in damage(d)


def test_share_splits_every_file_once_and_balances_bytes():
    sizes = {f"f{i}": s for i, s in enumerate([100, 5, 60, 40, 40, 1, 0, 20])}
    parts = [share(sizes, r, 3) for r in range(3)]
    assert sorted(f for p in parts for f in p) == sorted(sizes)
    loads = [sum(sizes[f] for f in p) for p in parts]
    assert max(loads) - min(loads) <= 100 and loads[0] == 100  # the largest file alone on rank 0
    assert parts == [share(sizes, r, 3) for r in range(3)]  # deterministic


# ------------------------------------------------------------------ choosing the checkpoint
def test_latest_intact_is_chosen_without_warnings(ckpts):
    for where in (ckpts, ckpts.parent):  # the checkpoints dir, or the output dir holding it
        choice = choose(where)
        assert choice.path == ckpts / "step_00000009" and choice.warnings == [] and choice.saved["global_step"] == 9


def test_fallback_passes_over_damaged_checkpoints_newest_first(ckpts):
    flip(ckpts / "step_00000009" / "optim.pt")
    (ckpts / "step_00000006" / "rosa_rng_rank0.pt").unlink()
    choice = choose(ckpts)
    assert choice.path == ckpts / "step_00000003"
    assert len(choice.warnings) == 2
    assert "step_00000009 is damaged" in choice.warnings[0] and "optim.pt is corrupted" in choice.warnings[0]
    assert "step_00000006 is damaged" in choice.warnings[1] and "rosa_rng_rank0.pt is missing" in choice.warnings[1]


def test_latest_naming_an_older_checkpoint_is_honoured(ckpts):
    """``latest`` says which checkpoint a resume continues from; newer ones are not considered."""
    (ckpts / "latest").write_text("step_00000006")
    assert choose(ckpts).path == ckpts / "step_00000006"
    flip(ckpts / "step_00000006" / "optim.pt")
    assert choose(ckpts).path == ckpts / "step_00000003"


@pytest.mark.parametrize("content, words", [
    (b"", "latest is empty"), (b"\xff\xfe\x00\x81", "latest is not text"),
    (b"step_00000099", "names 'step_00000099', which is no checkpoint"), (b"../../etc", "names '../../etc'"),
    (b"frozen", "names 'frozen', which is no checkpoint"),
])
def test_a_garbage_latest_is_named_and_ignored(ckpts, content, words):
    (ckpts / "latest").write_bytes(content)
    choice = choose(ckpts)
    assert choice.path == ckpts / "step_00000009"
    assert len(choice.warnings) == 1 and words in choice.warnings[0] and str(ckpts / "latest") in choice.warnings[0]


def test_no_latest_scans_the_step_dirs(ckpts):
    (ckpts / "latest").unlink()
    (ckpts / "step_00000012.partial").mkdir()  # an interrupted save is never a candidate
    assert choose(ckpts).path == ckpts / "step_00000009" and choose(ckpts).warnings == []


def test_all_damaged_or_nothing_to_resume_is_one_error(ckpts, tmp_path):
    for step in (3, 6, 9):
        (ckpts / f"step_{step:08d}" / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*\(3 checkpoints, all damaged: ") as err:
        choose(ckpts)
    for step in (9, 6, 3):  # each damaged file named, in the order tried
        assert f"step_{step:08d}: {ckpts / f'step_{step:08d}' / 'COMPLETE'} is missing" in str(err.value)
    only_partial = tmp_path / "p"
    (only_partial / "step_00000004.partial").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"only incomplete saves: step_00000004.partial"):
        choose(only_partial)
    with pytest.raises(CheckpointError, match=r"`resume` .*/nowhere: no such directory") as info:
        choose(tmp_path / "nowhere")
    with field_words(flag_words):
        assert str(info.value).startswith("--resume ")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*/empty \(no checkpoint\)"):
        choose(tmp_path / "empty")


def test_a_damaged_shared_frozen_record_falls_back_past_every_checkpoint_naming_it(tmp_path):
    """Steps 6 and 9 share the record ``run-0001-b``, step 3 names ``run-0001``: 16 bytes flipped in
    the shared record pass over both (each warning names the record's file) and load step 3."""
    root = tmp_path / "checkpoints"
    make_ckpt(root, 3)
    make_ckpt(root, 6, frozen="run-0001-b")
    make_ckpt(root, 9, frozen="run-0001-b")
    shard = root / "frozen" / "run-0001-b" / "replicated-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[100:116] = bytes(255 - b for b in data[100:116])
    shard.write_bytes(bytes(data))
    choice = choose(root)
    assert choice.path == root / "step_00000003"
    names = [w.split(" is damaged")[0] for w in choice.warnings]
    assert names == ["checkpoint step_00000009", "checkpoint step_00000006"]
    assert all(f"its frozen record: {shard} is corrupted" in w for w in choice.warnings), choice.warnings


def test_retention_keeps_a_fallback_that_names_another_frozen_record(tmp_path):
    """The two newest share one record: the newest older checkpoint naming another is kept too,
    with its record; everything else goes."""
    from rosa_ds.ds.checkpoint import prune

    root = tmp_path / "checkpoints"
    for step, key in ((2, "run-0000"), (3, "run-0001"), (4, "run-0001-b"), (6, "run-0001-b"), (9, "run-0001-b")):
        make_ckpt(root, step, frozen=key)
    prune(root, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000006", "step_00000009"]
    assert sorted(p.name for p in (root / "frozen").iterdir()) == ["run-0001", "run-0001-b"]
    make_ckpt(root, 12, frozen="run-0001")  # the two newest name different records: two kept
    prune(root, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000009", "step_00000012"]


def test_an_explicit_damaged_checkpoint_is_an_error_naming_the_file(ckpts):
    ckpt = ckpts / "step_00000009"
    flip(ckpt / "optim.pt")
    with pytest.raises(CheckpointError) as info:
        choose(ckpt)
    text = str(info.value)
    assert text.startswith(f"`resume` {ckpt}: the checkpoint is damaged: {ckpt / 'optim.pt'} is corrupted")
    with field_words(flag_words):
        assert str(info.value).startswith(f"--resume {ckpt}: the checkpoint is damaged")
        assert str(info.value).endswith("start again without --resume")
    assert "\n" not in text
    assert choose(ckpts / "step_00000006").path == ckpts / "step_00000006"  # an intact one loads as given


# ------------------------------------------------------------------ compatibility from the files
def write_run_config(ckpts, **values):
    (ckpts.parent / "config.json").write_text(json.dumps({"method": "rosa", "rank": 4, **values}))


NOW = {"world_size": 2, "zero_stage": 2, "method": "rosa", "rank": 4, "quantize_base": None}


def check(choice, now):
    """The trainer's check: ``verify.check_choice`` worded by ``recipe.resume``."""
    try:
        return check_choice(choice, now)
    except ResumeMismatch as exc:
        raise CheckpointError(refusal(exc)) from None


@pytest.mark.parametrize("now, words", [
    ({"world_size": 1}, "saved by 2 ranks, this run has 1"),
    ({"zero_stage": 3}, "ZeRO stage 2, this run uses 3 (use the saving run's --deepspeed config)"),
    ({"rank": 8}, "saved with --rank 4, this run has --rank 8 (use --rank 4)"),
    ({"method": "lora"}, "saved with --method rosa, this run has --method lora"),
    ({"quantize_base": "nf4"}, "saved with no --quantize-base, this run has --quantize-base nf4"),
])
def test_resume_mismatch_is_one_line_naming_the_flag(ckpts, now, words):
    write_run_config(ckpts)
    choice = choose(ckpts)
    check(choice, NOW)
    with pytest.raises(CheckpointError) as info:
        check(choice, {**NOW, **now})
    assert words in str(info.value) and str(info.value).startswith("--resume: cannot continue from")
    assert "RosaConfig" not in str(info.value) and "\n" not in str(info.value)


PLAN = {"method": "rosa", "rank": 4, "micro_batch": 4, "grad_accum": 1, "data": "abc", "seq_len": 48, "pack": False,
        "lr": 3e-3, "warmup": 0.1, "epochs": 2, "max_steps": None, "weight_decay": 0.0}


@pytest.mark.parametrize("change, words", [
    ({"micro_batch": 2}, "saved with --micro-batch 4, this run has --micro-batch 2 (use --micro-batch 4: the same "
                         "step would train other samples)"),
    ({"grad_accum": 2}, "saved with --grad-accum 1, this run has --grad-accum 2"),
    ({"seq_len": 64}, "saved with --seq-len 48, this run has --seq-len 64"),
    ({"pack": True}, "saved with --no-pack, this run has --pack (use --no-pack"),
    ({"data": "other"}, "saved with other training data (--dataset, its content"),
])
def test_a_resume_that_moves_the_step_to_sample_mapping_is_refused(ckpts, change, words):
    """Every fact the checkpoint recorded in its plan is compared; all differences in one line."""
    ckpt = ckpts / "step_00000009"
    state = json.loads((ckpt / "rosa_state.json").read_text())
    choice = choose(ckpts)
    choice.saved = {**state, "client_state": {"plan": PLAN}}
    assert check(choice, {**NOW, **PLAN}) == []
    with pytest.raises(CheckpointError) as info:
        check(choice, {**NOW, **PLAN, **change, "world_size": 4})
    text = str(info.value)
    assert words in text and "saved by 2 ranks, this run has 4" in text and "\n" not in text


def test_schedule_changes_are_returned_for_the_notice(ckpts):
    choice = choose(ckpts)
    choice.saved = {**choice.saved, "client_state": {"plan": PLAN}}
    changes = check(choice, {**NOW, **PLAN, "lr": 6e-3, "epochs": 3})
    assert [(d.field, d.saved, d.now) for d in changes] == [("lr", 3e-3, 6e-3), ("epochs", 2, 3)]
    line, record = notice(choice.path, changes)
    assert "--lr 0.003 -> 0.006, --epochs 2 -> 3" in line
    assert record == {"lr": {"checkpoint": 3e-3, "now": 6e-3}, "epochs": {"checkpoint": 2, "now": 3}}


def test_lora_rank_comes_from_the_run_config(ckpts):
    write_run_config(ckpts, method="lora", rank=16)
    choice = choose(ckpts)
    choice.saved["rosa_config"] = None
    check(choice, {**NOW, "method": "lora", "rank": 16})
    with pytest.raises(CheckpointError, match="--rank 16, this run has --rank 4"):
        check(choice, {**NOW, "method": "lora"})


# ------------------------------------------------------------------ metrics rewind
def metrics_file(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


RUN = ([{"step": s, "loss": 1.0} for s in (1, 2, 3)]
       + [{"event": "eval", "step": 3}, {"event": "checkpoint", "step": 3}]
       + [{"step": s, "loss": 1.0} for s in (4, 5)]
       + [{"event": "checkpoint", "step": 5}, {"event": "memory"}])


def test_rewind_keeps_up_to_the_checkpoint_event_of_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    metrics_file(path, RUN)
    assert rewind(path, 3) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == RUN[:5]
    assert rewind(path, 3) == 0  # already there: untouched


def test_rewind_without_the_event_or_after_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    metrics_file(path, [r for r in RUN if r.get("event") != "checkpoint"])
    assert rewind(path, 4) == 2  # step 5 and what follows
    assert [json.loads(line).get("step") for line in path.read_text().splitlines()] == [1, 2, 3, 3, 4]
    metrics_file(path, RUN[:6], tail='{"step": 5, "lo')  # killed mid-write
    assert rewind(path, 4) == 1 and path.read_text().endswith('"loss": 1.0}\n')
    assert rewind(tmp_path / "absent.jsonl", 3) == 0


# ------------------------------------------------------------------ failed writes
def test_write_failures_are_classified_by_errno_then_free_space(tmp_path):
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"), free=10 << 30)
    assert not is_no_space(OSError(errno.EIO, "Input/output error"), free=0)
    try:  # torch's writer wraps a Python file object's OSError: the errno is found on the chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as wrapped:
        assert wrapped.__cause__ is None and is_no_space(wrapped, free=10 << 30)
    plain = RuntimeError("basic_ios::clear: iostream error")  # the C++ writer on a path: no errno at all
    assert is_no_space(plain, free=1 << 20) and not is_no_space(plain, free=10 << 30)


def test_the_guard_keeps_the_first_failure_and_skips_later_writes(tmp_path):
    guard, calls = WriteGuard(tmp_path), []

    def fail():
        calls.append("fail")
        raise OSError(errno.ENOSPC, "No space left on device")

    assert guard.run(tmp_path / "a", lambda: calls.append("a") or 1) == 1
    assert guard.run(tmp_path / "b", fail) is None
    assert guard.run(tmp_path / "c", lambda: calls.append("c")) is None
    assert calls == ["a", "fail"] and guard.failure == (str(tmp_path / "b"), "no space left on device", True)
    with pytest.raises(ZeroDivisionError):  # a bug is not a write failure
        WriteGuard(tmp_path).run(tmp_path / "d", lambda: 1 / 0)
