"""Method-core tests on tiny GPT-2 (Conv1D), Llama-style and BERT models built from configs."""
import copy
import logging

import pytest
import torch
from torch import nn

import rosa_ds
from rosa_ds import RosaConfig, apply_rosa, merge_and_unload, resample, trainable_report
from rosa_ds.inject import iter_rosa_layers
from tests.helpers.models import tiny_model

KINDS = ["gpt2", "llama", "bert"]


def batch(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    return {"input_ids": ids}


def out(model, kind, seed=0):
    model.eval()
    with torch.no_grad():
        o = model(**batch(kind, seed))
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def train_steps(model, kind, opt, steps=3):
    model.train()
    for i in range(steps):
        o = model(**batch(kind, 100 + i))
        t = o.logits if hasattr(o, "logits") else o.last_hidden_state
        loss = t.float().pow(2).mean() if kind == "bert" else torch.nn.functional.cross_entropy(
            t[:, :-1].reshape(-1, t.shape[-1]), batch(kind, 100 + i)["input_ids"][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_agree_through_apply_resamples_training_and_merge(kind, rel):
    model = tiny_model(kind)
    ref = out(model, kind)
    apply_rosa(model, RosaConfig(rank=4, seed=3))
    assert rel(out(model, kind), ref) < 1e-5  # W_f + A B = W
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for r in range(1, 4):
        before = out(model, kind)
        resample(model, resample_index=r)  # a resample alone changes nothing in the function
        assert rel(out(model, kind), before) < 1e-5
        trained_before = out(model, kind)
        train_steps(model, kind, opt)
        assert rel(out(model, kind), trained_before) > 1e-5  # real training happened (100x rounding)
    unmerged = out(model, kind)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, rosa_ds.RosaLinear) for m in plain.modules())
    assert rel(out(plain, kind), unmerged) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_factors_and_count_is_exact(kind):
    model = tiny_model(kind)
    original = copy.deepcopy(model)
    apply_rosa(model, RosaConfig(rank=3))
    layers = list(iter_rosa_layers(model))
    assert layers
    expected = sum(3 * (l.out_features + l.in_features) for _, l in layers)
    report = trainable_report(model)
    assert report.trainable == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.frozen == sum(p.numel() for p in original.parameters())  # every original weight frozen
    o = model(**batch(kind))
    t = o.logits if hasattr(o, "logits") else o.last_hidden_state
    (t.sum() + (o.pooler_output.sum() if kind == "bert" else 0)).backward()
    for name, p in model.named_parameters():
        if "rosa_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_state_dict_keys_round_trip_and_modules_to_save():
    model = tiny_model("bert-cls")
    keys = list(model.state_dict().keys())
    apply_rosa(model, RosaConfig(rank=2, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all("rosa_" in n or n.startswith("classifier.") for n in trainable)
    assert list(merge_and_unload(model).state_dict().keys()) == keys


def test_trainable_report_rho():
    model = nn.Sequential(nn.Linear(768, 768))
    apply_rosa(model, RosaConfig(rank=8, target_modules=["0"]))
    report = trainable_report(model)
    assert report.trainable == 8 * (768 + 768) == 12288
    assert report.rho == pytest.approx(768 * 768 / 12288) == 48.0
    assert "rho 48.00" in str(report)


def test_dtype_and_device_kept_and_bias_untouched():
    model = tiny_model("llama").to(torch.bfloat16)
    model.model.layers[0].self_attn.q_proj = nn.Linear(32, 32, bias=True).to(torch.bfloat16)
    bias = model.model.layers[0].self_attn.q_proj.bias.clone()
    apply_rosa(model, RosaConfig(rank=2))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.rosa_A.dtype == torch.bfloat16 and layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base_layer.bias, bias)


def test_unmatched_target_names_are_warned_about(caplog):
    """A listed name that matches nothing is named in a warning; the names that match are adapted."""
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="rosa_ds"):
        apply_rosa(model, RosaConfig(rank=2, target_modules=("q_proj", "v_porj", "w_in")))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "v_porj, w_in matched no module (adapting only q_proj)" in warnings[0], warnings
    assert len(list(iter_rosa_layers(model))) == 2  # q_proj of both blocks
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rosa_ds"):
        apply_rosa(tiny_model("llama"), RosaConfig(rank=2, target_modules=("q_proj", "v_proj")))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_factor_parameter_objects_survive_resample():
    model = tiny_model("gpt2")
    apply_rosa(model, RosaConfig(rank=2))
    before = {n: p for n, p in model.named_parameters() if p.requires_grad}
    values = {n: p.detach().clone() for n, p in before.items()}
    resample(model, resample_index=1)
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(before[n] is after[n] and after[n].requires_grad for n in before)
    assert any(not torch.equal(values[n], after[n]) for n in before)


def test_merged_model_saves_and_reloads_with_plain_transformers(tmp_path, rel):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2")
    apply_rosa(model, RosaConfig(rank=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, "gpt2", opt)
    expected = out(model, "gpt2")
    merge_and_unload(model).save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert rel(out(reloaded, "gpt2"), expected) < 1e-5


def test_merged_state_dict_equals_merge_and_unload(rel):
    model = tiny_model("gpt2")
    apply_rosa(model, RosaConfig(rank=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    sd = rosa_ds.merged_state_dict(model.state_dict(), model)
    plain = merge_and_unload(model).state_dict()
    assert sd.keys() == plain.keys()
    assert all(rel(sd[k], plain[k]) < 1e-6 for k in plain if plain[k].is_floating_point() and plain[k].norm() > 0)


# --- bad input: a clear error, and nothing is modified -------------------------------------
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("config, error, message", [
    (dict(rank=32), ValueError, r"rank 32 is too large for layer transformer\.h\.0\.attn\.c_attn \(96x32\): "
                                r"the largest valid rank for it is 31"),
    (dict(target_modules=["nope"]), ValueError, r"matched no module.*transformer\.h\.0\.attn\.c_attn"),
    (dict(target_modules=r"transformer\.h\.0\.ln_1"), ValueError, r"cannot adapt .*ln_1 \(LayerNorm\)"),
])
def test_bad_input_is_rejected_without_modifying_the_model(config, error, message):
    model = tiny_model("gpt2")
    state, types = _snapshot(model)
    with pytest.raises(error, match=message):
        apply_rosa(model, RosaConfig(**config))
    after, after_types = _snapshot(model)
    assert types == after_types and all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("field, value, message", [
    ("strategy", "middle", r"strategy 'middle' does not exist; choose one of random, smallest, largest"),
    ("rank", 0, r"RosaConfig.rank must be >= 1, got 0"),
    ("rank", True, r"RosaConfig.rank must be an integer, got True \(bool\)"),
    ("target_modules", [], "RosaConfig.target_modules is empty"),
    ("init", "gauss", "init 'gauss' does not exist"),
    ("target_modules", "(", "not a valid regex"),
])
def test_bad_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        RosaConfig(**{field: value})


@pytest.mark.parametrize("op", ["merge", "resample"])
def test_non_finite_factors_refuse_merge_and_leave_model_alone(op):
    model = tiny_model("gpt2")
    apply_rosa(model, RosaConfig(rank=2))
    layers = list(iter_rosa_layers(model))
    with torch.no_grad():
        layers[-1][1].rosa_A[0, 0] = float("nan")
    state, types = _snapshot(model)
    with pytest.raises(FloatingPointError, match=r"transformer\.h\.1\.mlp\.c_proj: rosa_A has non-finite values"):
        merge_and_unload(model) if op == "merge" else resample(model, resample_index=1)
    after, after_types = _snapshot(model)
    assert types == after_types
    assert all(torch.equal(state[k], after[k]) or torch.isnan(state[k]).any() for k in state)


def test_resample_without_apply_is_clear():
    with pytest.raises(ValueError, match="call rosa_ds.apply_rosa"):
        resample(tiny_model("gpt2"))
