"""DeepSpeed templates: "auto" filling, contradictions reported together, batch identity, checks."""
import copy
import json
import re
from dataclasses import replace

import pytest

from rosa_ds.ds import config as dc
from rosa_ds.ds.config import DSConfigError, RunValues, build_ds_config
from rosa_ds.errors import field_words
from rosa_ds.recipe.words import flag_words

RUN = dict(micro_batch=4, grad_accum=2, lr=3e-4, total_steps=100, warmup_steps=10, weight_decay=0.01)


def run(**kw) -> RunValues:
    return RunValues(**{**RUN, **kw})


def template(name: str = "zero2") -> dict:
    return json.loads((dc.TEMPLATES_DIR / f"{name}.json").read_text())


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(dc, "detect_precision", lambda: "fp32")
    monkeypatch.setattr(dc.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dc, "accelerator_name", lambda: "cpu")


@pytest.mark.parametrize("name", ["zero3", "zero3_offload"])
def test_zero3_buffers_are_chosen_by_accelerator(monkeypatch, name):
    """The CPU's ZeRO-3 values on a GPU mean hundreds of tiny all-gathers of the factors per pass:
    a GPU gets its own (prefetch >= 5e7, overlap on, every factor persistent); explicit JSON wins."""
    cpu = build_ds_config(name, run(), 2)["zero_optimization"]
    monkeypatch.setattr(dc, "accelerator_name", lambda: "cuda")
    gpu = build_ds_config(name, run(), 2)["zero_optimization"]
    assert cpu["stage3_prefetch_bucket_size"] == 5e6 and cpu["overlap_comm"] is False
    assert gpu["stage3_prefetch_bucket_size"] >= 5e7 and gpu["overlap_comm"] is True
    assert gpu["stage3_param_persistence_threshold"] >= 64 * 11008  # Llama-7B's largest factor at R = 64
    explicit = template(name)
    explicit["zero_optimization"]["overlap_comm"] = False
    assert build_ds_config(explicit, run(), 2)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("name", dc.TEMPLATE_NAMES)
def test_every_template_fills_every_auto(name):
    cfg = build_ds_config(name, run(), world_size=2)
    assert dc._find_auto(cfg) == []
    assert dc.batch_sizes(cfg) == (4, 2, 16)
    assert cfg["optimizer"]["params"]["lr"] == 3e-4
    assert cfg["optimizer"]["params"]["weight_decay"] == 0.01
    p = cfg["scheduler"]["params"]
    assert (p["warmup_max_lr"], p["warmup_num_steps"], p["total_num_steps"]) == (3e-4, 10, 100)
    assert dc.precision(cfg) == "fp32" and cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert dc.zero_stage(cfg) == int(name[4])
    assert dc.offload_optimizer(cfg) == name.endswith("offload")
    if dc.offload_optimizer(cfg):
        assert cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] is False  # no CUDA here
        assert "torch_adam" not in cfg["optimizer"]["params"]  # ZeRO-Offload needs DeepSpeedCPUAdam
    else:
        assert cfg["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam build
    # DeepSpeed's 5e8 default would allocate a 2 GB bucket: every template sets it small.
    assert cfg["zero_optimization"]["reduce_bucket_size"] <= 5e7


def test_template_is_not_mutated_and_names_resolve():
    tpl = template()
    before = copy.deepcopy(tpl)
    build_ds_config(tpl, run(), 1)
    assert tpl == before
    assert dc.resolve_template("zero3") == dc.TEMPLATES_DIR / "zero3.json"
    with pytest.raises(ValueError, match="'zero9' not found; give a JSON path or one of zero1"):
        dc.resolve_template("zero9")


def test_precision_auto_follows_hardware(monkeypatch):
    monkeypatch.setattr(dc, "detect_precision", lambda: "bf16")
    cfg = build_ds_config("zero2", run(), 2)
    assert dc.precision(cfg) == "bf16" and cfg["fp16"]["enabled"] is False
    fp16 = run(precision="fp16", explicit={"precision"})
    monkeypatch.setattr(dc.torch.cuda, "is_available", lambda: True)
    assert dc.precision(build_ds_config("zero2", fp16, 2)) == "fp16"
    monkeypatch.setattr(dc.torch.cuda, "is_available", lambda: False)  # the CPU accelerator has no fp16
    with pytest.raises(DSConfigError, match="DeepSpeed's CPU accelerator does not support fp16; fix: use fp32"):
        build_ds_config("zero2", fp16, 2)


def test_explicit_json_values_win_over_unset_flags():
    tpl = template()
    tpl.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3)
    tpl["optimizer"]["params"]["lr"] = 1e-3
    tpl["scheduler"]["params"]["warmup_max_lr"] = "auto"
    tpl["bf16"]["enabled"] = True
    cfg = build_ds_config(tpl, run(), 2)
    assert dc.batch_sizes(cfg) == (2, 3, 12)
    assert cfg["scheduler"]["params"]["warmup_max_lr"] == 1e-3  # the JSON's lr, not the run default
    assert dc.precision(cfg) == "bf16" and cfg["fp16"]["enabled"] is False


def test_explicit_train_batch_size_derives_accumulation():
    tpl = template()
    tpl["train_batch_size"] = 48
    assert dc.batch_sizes(build_ds_config(tpl, run(), 2)) == (4, 6, 48)


def test_all_contradictions_in_one_error():
    tpl = template()
    tpl.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=24)
    tpl["optimizer"]["params"].update(lr=1e-3, weight_decay=0.1)
    tpl["scheduler"]["params"].update(warmup_num_steps=5, total_num_steps=50)
    tpl["bf16"]["enabled"] = True
    flags = run(micro_batch=8, grad_accum=1, lr=1e-4, weight_decay=0.0, warmup_steps=7, total_steps=70,
                precision="fp32", explicit=set(dc.EXPLICIT_FIELDS))
    with pytest.raises(DSConfigError) as info:
        build_ds_config(tpl, flags, world_size=2)
    msg = str(info.value)
    with field_words(flag_words):  # as the recipe's command line says them
        rendered = str(info.value)
    expected = [
        'train_micro_batch_size_per_gpu=4 in <dict> contradicts --micro-batch 8; fix: drop --micro-batch, or set '
        'train_micro_batch_size_per_gpu to "auto" (or to 8)',
        "gradient_accumulation_steps=2 in <dict> contradicts --grad-accum 1",
        "optimizer.params.lr=0.001 in <dict> contradicts --lr 0.0001",
        "optimizer.params.weight_decay=0.1 in <dict> contradicts --weight-decay 0.0",
        "scheduler.params.warmup_num_steps=5 in <dict> contradicts --warmup 7",
        "scheduler.params.total_num_steps=50 in <dict> contradicts --max-steps 70",
        'bf16.enabled=true in <dict> contradicts --precision fp32; fix: drop --precision, or set bf16.enabled to '
        '"auto" (or to false)',
        "train_batch_size=24 in <dict> is not divisible by micro-batch 8 × world size 2 = 16",
    ]
    fields = {"--micro-batch": "micro_batch", "--grad-accum": "grad_accum", "--lr": "lr",
              "--weight-decay": "weight_decay", "--warmup": "warmup_steps", "--max-steps": "total_steps",
              "--precision": "precision"}
    for fragment in expected:
        assert fragment in rendered, fragment
        unrendered = re.sub(r"--[a-z-]+", lambda m: f"`{fields[m.group()]}`", fragment)
        assert unrendered in msg, unrendered
    assert msg.startswith("8 problems in DeepSpeed config <dict>:")
    assert len(info.value.problems) == 8 and isinstance(info.value, ValueError)


def test_batch_identity_contradiction_names_flags():
    tpl = template()
    tpl["train_batch_size"] = 32
    with pytest.raises(DSConfigError, match=r"train_batch_size=32 in <dict> contradicts `micro_batch` 4 × "
                                            r"`grad_accum` 2 × world size 2 = 16; fix: set train_batch_size to "
                                            r'"auto" \(or 16\)') as info:
        build_ds_config(tpl, run(explicit={"grad_accum"}), 2)
    with field_words(flag_words):
        assert "contradicts --micro-batch 4 × --grad-accum 2 × world size 2 = 16" in str(info.value)


@pytest.mark.parametrize("micro,world,total", [(4, 2, 20), (3, 1, 10), (5, 3, 45 + 1)])
def test_train_batch_not_divisible(micro, world, total):
    tpl = template()
    tpl["train_batch_size"] = total
    with pytest.raises(DSConfigError, match=f"train_batch_size={total} in <dict> is not divisible by micro-batch "
                                            f"{micro} × world size {world} = {micro * world}; fix: set "
                                            f'train_batch_size to "auto" or to a multiple of {micro * world}'):
        build_ds_config(tpl, run(micro_batch=micro), world)


def test_matching_explicit_values_are_fine():
    tpl = template()
    tpl.update(train_micro_batch_size_per_gpu=8, train_batch_size=16)
    tpl["optimizer"]["params"]["lr"] = 1e-4
    cfg = build_ds_config(tpl, run(micro_batch=8, grad_accum=1, lr=1e-4, explicit={"micro_batch", "lr"}), 2)
    assert dc.batch_sizes(cfg) == (8, 1, 16)


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c["zero_optimization"].update(stage=4),
     "zero_optimization.stage=4 in <dict> does not exist; fix: use 1, 2 or 3"),
    (lambda c: c["zero_optimization"].update(stage=0, offload_optimizer={"device": "cpu"}),
     "offload_optimizer needs ZeRO stage >= 1 but stage is 0"),
    (lambda c: c["zero_optimization"].update(offload_param={"device": "cpu"}),
     "offload_param needs ZeRO stage 3 but stage is 2"),
    (lambda c: c["zero_optimization"].update(offload_optimizer={"device": "disk"}),
     "offload_optimizer.device='disk' in <dict>; fix: use cpu or none"),
    (lambda c: c.update(steps_per_print="auto"), 'steps_per_print still "auto" in <dict>; fix: fill them'),
    (lambda c: c.update(train_micro_batch_size_per_gpu="4"),
     "train_micro_batch_size_per_gpu='4' in <dict> is not valid"),
    (lambda c: c.update(fp16={"enabled": True}, bf16={"enabled": True}), "bf16.enabled and fp16.enabled are both true"),
    (lambda c: c["scheduler"]["params"].update(warmup_max_lr=1e-3) or c["optimizer"]["params"].update(lr=2e-3),
     "optimizer.params.lr=0.002 and scheduler.params.warmup_max_lr=0.001 disagree in <dict>"),
])
def test_structural_problems(edit, fragment):
    tpl = template()
    edit(tpl)
    with pytest.raises(DSConfigError) as info:
        build_ds_config(tpl, run(), 2)
    assert fragment in str(info.value)


def test_stage0_and_8bit_offload_refused_before_deepspeed():
    tpl = template()
    tpl["zero_optimization"] = {"stage": 0}
    with pytest.raises(DSConfigError, match="ZeRO stage 0 .* is not supported by rosa_ds.*fix: use stage 1"):
        build_ds_config(tpl, run(), 2)
    with pytest.raises(DSConfigError, match="runs DeepSpeed's CPU Adam, so a client optimizer .* cannot be offloaded"):
        build_ds_config("zero2_offload", run(optim="adamw8bit"), 2)


def test_client_optimizer_split():
    cfg, params = dc.client_optimizer_config(build_ds_config("zero2", run(optim="adamw8bit"), 2))
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    assert params == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}


@pytest.mark.parametrize("kw,fragment", [
    ({"micro_batch": 0}, "RunValues.micro_batch must be a positive integer, got 0"),
    ({"lr": -1.0}, "RunValues.lr must be a positive number"),
    ({"precision": "fp8"}, "RunValues.precision 'fp8' does not exist; choose one of auto, fp32, bf16, fp16"),
    ({"explicit": {"micro"}}, "RunValues.explicit names unknown fields ['micro']"),
])
def test_run_values_validation(kw, fragment):
    with pytest.raises(ValueError) as info:
        run(**kw)
    assert fragment in str(info.value)


def test_world_size_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        build_ds_config("zero2", run(), 0)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        build_ds_config(bad, run(), 1)


def test_zero_warmup_is_clamped_for_deepspeed():
    # DeepSpeed's WarmupDecayLR raises on warmup_num_steps=0 (and treats values below 2 as 2).
    cfg = build_ds_config("zero2", run(warmup_steps=0), 2)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1


@pytest.mark.parametrize("device", ["none", "cpu", "nvme"])
def test_planner_and_seam_read_offload_alike(device):
    """One reader (rosa_ds.memory.ds_json): the memory plan and the seam agree on offload targets."""
    from rosa_ds.memory import MemoryPlan

    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": device}}}
    assert MemoryPlan.from_ds_config(cfg, accelerator="cpu").offload_optimizer is dc.offload_optimizer(cfg)
    assert dc.offload_optimizer(cfg) is (device != "none")


def test_optim_sgd_is_plain_sgd_without_state():
    """--optim sgd: torch.optim.SGD, no momentum, the run's lr and weight decay, scheduler kept;
    the memory plan predicts no optimizer state for it."""
    from rosa_ds.memory import MemoryPlan
    from rosa_ds.memory.predict import optimizer_state_bytes

    run = dc.RunValues(micro_batch=4, grad_accum=1, lr=0.05, total_steps=10, weight_decay=0.0, optim="sgd")
    cfg = dc.build_ds_config("zero2", run, world_size=2)
    assert cfg["optimizer"] == {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}}
    assert cfg["zero_allow_untested_optimizer"] is True and cfg["scheduler"]["params"]["warmup_max_lr"] == 0.05
    plan = MemoryPlan.from_ds_config(cfg, optimizer="sgd", accelerator="cpu")
    assert optimizer_state_bytes([1000, 24], plan) == 0
    assert optimizer_state_bytes([1000], replace(plan, optimizer="adamw")) > 0
