"""Engine pieces that need no processes: checkpoint resolution and compatibility, config refusals,
the resample schedule and owner assignment."""
import json

import pytest

from rosa_ds import RosaConfig
from rosa_ds.ds.checkpoint import FORMAT, CheckpointError, check_compatible, resolve
from rosa_ds.errors import field_words
from rosa_ds.recipe.words import flag_words
from rosa_ds.schedule import ScheduleConfig


def _complete(path, tag):
    d = path / tag
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text(json.dumps({"tag": tag, "files": {}}))
    return d


def test_resolve_uses_latest_and_accepts_a_checkpoint_dir(tmp_path):
    _complete(tmp_path, "step_00000004")
    (tmp_path / "latest").write_text("step_00000004")
    assert resolve(tmp_path, None) == (tmp_path, "step_00000004")
    assert resolve(tmp_path / "step_00000004", None) == (tmp_path, "step_00000004")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in .*start without `resume`") as info:
        resolve(tmp_path, None)
    with field_words(flag_words):
        assert str(info.value).endswith("start without --resume")


def test_half_written_checkpoint_is_refused(tmp_path):
    (tmp_path / "step_00000008.partial").mkdir()  # a save that crashed before its rename
    with pytest.raises(CheckpointError, match=r"found only incomplete saves: step_00000008\.partial"):
        resolve(tmp_path, None)
    (tmp_path / "step_00000008").mkdir()  # a directory without the COMPLETE marker
    (tmp_path / "latest").write_text("step_00000008")
    with pytest.raises(CheckpointError, match=r"incomplete or missing \(no COMPLETE marker"):
        resolve(tmp_path, None)


def _desc(rank=8, world=2, stage=2, layers=(("h.0.q", 8, 8, 8),)):
    return {"format": FORMAT, "world_size": world, "zero_stage": stage, "rosa_config": {"rank": rank},
            "layers": [list(l) for l in layers]}


def test_compatibility_reports_every_difference_at_once(tmp_path):
    with pytest.raises(CheckpointError) as err:
        check_compatible(_desc(), _desc(rank=4, world=4, stage=3, layers=(("h.0.k", 8, 8, 4),)), tmp_path)
    msg = str(err.value)
    for part in ("world_size: checkpoint 2, this run 4", "zero_stage: checkpoint 2, this run 3",
                 "rank: checkpoint 8, this run 4", "layers: checkpoint 1 layers (only here: ['h.0.q']), "
                 "this run 1 layers (only here: ['h.0.k'])"):
        assert part in msg
    check_compatible(_desc(), _desc(), tmp_path)  # identical: no error


@pytest.mark.parametrize("cfg, client, message", [
    ({"zero_optimization": {"stage": 0}}, False, "ZeRO stage 0 .* is not supported by rosa_ds"),
    ({}, False, "ZeRO stage 0 .* is not supported"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, False,
     "bf16.enabled and fp16.enabled are both true"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, True,
     "a client optimizer .* cannot be offloaded"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, False,
     "offload_optimizer.device=nvme .* is not supported by rosa_ds"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
      "optimizer": {"params": {"lr": "auto"}}},
     False, r"train_micro_batch_size_per_gpu, optimizer\.params\.lr still \"auto\" in <dict>; fix: fill them with"),
    pytest.param({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, False,
                 "DeepSpeed's CPU accelerator does not support fp16",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only refusal")),
])
def test_unsupported_stage_and_optimizer_combinations(cfg, client, message):
    """The one validator refuses what rosa_ds cannot run, naming the fix (initialize calls it)."""
    from rosa_ds.ds.config import check_ds_config

    with pytest.raises(ValueError, match=message):
        check_ds_config(cfg, client_optimizer=client)


def test_validator_reports_every_problem_at_once():
    from rosa_ds.ds.config import DSConfigError, check_ds_config

    cfg = {"zero_optimization": {"stage": 0, "offload_param": {"device": "cpu"}}, "steps_per_print": "auto",
           "bf16": {"enabled": True}, "fp16": {"enabled": True}}
    with pytest.raises(DSConfigError) as info:
        check_ds_config(cfg)
    assert len(info.value.problems) == 4, info.value.problems


def test_schedule_epoch_steps_and_rewarmup():
    epoch = ScheduleConfig("epoch")
    assert [epoch.due_at_epoch_end(e, 3) for e in range(3)] == [True, True, False]
    assert not epoch.due_after_step(5)
    steps = ScheduleConfig("4", rewarmup_steps=2)
    assert steps.resample_every == 4 and [steps.due_after_step(s) for s in (3, 4, 8)] == [False, True, True]
    assert [steps.lr_factor(s) for s in (None, 0, 1, 2)] == [1.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="resample_every 'weekly' is not valid; fix: use epoch, never, or a positive"):
        ScheduleConfig("weekly")


def test_no_resample_after_the_final_step():
    """The one rule the CLI engine and the Trainer callback share (``schedule.finished``): a run
    of 8 steps resampling every 4 resamples after step 4 only; a 2-epoch step limit that ends at
    the first epoch's boundary does not resample there."""
    steps = ScheduleConfig(4)
    assert [s for s in range(1, 9) if steps.due_after_step(s, total_steps=8)] == [4]
    assert [s for s in range(1, 9) if steps.due_after_step(s)] == [4, 8]  # total unknown: as before
    assert steps.due_after_step(4, total_steps=8, done=8) is False  # applied steps 4, but the run is done
    epoch = ScheduleConfig("epoch")
    assert epoch.due_at_epoch_end(0, 3, done=5, total_steps=10) and not epoch.due_at_epoch_end(0, 3, 5, 5)


def test_engine_does_not_resample_after_its_total_steps(monkeypatch):
    """``RosaEngine.total_steps`` (set by the CLI trainer) is the schedule's run length."""
    from rosa_ds.ds import engine as ds_engine
    from rosa_ds.ds import resample
    from tests.unit.test_cuda_path import FakeDeepSpeed

    fake, resampled_at = FakeDeepSpeed(), []
    monkeypatch.setattr(resample, "distributed_resample", lambda *a, **k: resampled_at.append(fake.global_steps)
                        or {"layers": 0})
    monkeypatch.setattr(resample, "reset_factor_state", lambda *a: 0)
    eng = ds_engine.RosaEngine(fake, RosaConfig(rank=1), ScheduleConfig(2))
    eng.total_steps = 4
    for _ in range(4):
        eng.step()
    assert resampled_at == [2] and eng.end_epoch(0, 2) is None


def test_owner_assignment_is_balanced_and_rounds_hold_one_layer_per_rank():
    """Pure arithmetic: runs without DeepSpeed."""
    from torch import nn

    from rosa_ds.layer import RosaLinear
    from rosa_ds.owners import assign_owners, rounds

    layers = [RosaLinear(nn.Linear(n, m), 2, i) for i, (m, n) in enumerate([(64, 64), (64, 64), (32, 32), (32, 32),
                                                                           (16, 16)])]
    owners = assign_owners(layers, 2)
    cost = [0, 0]
    for l in layers:
        cost[owners[l.layer_index]] += l.out_features * l.in_features * min(l.out_features, l.in_features)
    assert abs(cost[0] - cost[1]) <= 16 ** 3
    for group in rounds(layers, owners, 2):
        assert len({owners[l.layer_index] for l in group}) == len(group)
    assert sorted(l.layer_index for g in rounds(layers, owners, 2) for l in g) == list(range(5))
