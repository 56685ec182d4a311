"""Memory accountant: hand-computed cases, closed forms, counts on meta models, bad input, CLI."""
import json
import subprocess
import sys
import time

import pytest
import torch

from rosa_ds import RosaConfig, apply_rosa
from rosa_ds.memory import (
    MemoryBreakdown,
    MemoryPlan,
    compare,
    counts_from_module,
    exact_reduction,
    paper_reduction,
    predict,
    rho_of,
    write_memory_report,
)
from rosa_ds.memory.counts import ModelCounts
from rosa_ds.memory.predict import padded, zero2_grad_partition
from tests.helpers.models import tiny_model

M = N = 768
R = 8
FULL_768 = ModelCounts(groups=[[M * N]])
ROSA_768 = ModelCounts(frozen=[M * N], groups=[[M * R, R * N]], adapted=[(M, N)], rank=R)


def plan(**kw):
    """The paper's accounting: no fp32 masters of W_f (their own test below)."""
    return MemoryPlan(**{"method": "rosa", "rank": R, "zero_stage": 0, "world_size": 1, "dtype": "fp32",
                         "frozen_master": False, **kw})


# (stage, N, dtype, full state bytes, ROSA state bytes), computed by hand for one 768x768 matrix,
# R = 8 (12,288 factor elements, rho = 48). Adam keeps one 4-byte step scalar per tensor it sees.
HAND = [
    # stage 0 fp32: full 16 B/param (+1 step); ROSA 4 B per W_f element + 16 per factor (+2 steps)
    (0, 1, "fp32", 16 * 589_824 + 4, 4 * 589_824 + 16 * 12_288 + 8),
    # ZeRO-1, N=1, bf16: 2 (weights) + 2 (grads) + 4 (master) + 8 (moments); 1 flat group -> 1 step
    (1, 1, "bf16", 16 * 589_824 + 4, 2 * 589_824 + 16 * 12_288 + 4),
    # ZeRO-2, N=4, fp32: weights replicated (4), master + moments / 4. Gradients are held per
    # whole parameter overlapping the rank's partition: the single 768x768 weight straddles every
    # partition, so each rank holds all of its gradient; ROSA's rank 0 holds A (6,144) but not B.
    (2, 4, "fp32", 4 * 589_824 + 4 * 589_824 + 12 * 589_824 // 4 + 4,
     4 * 589_824 + 4 * 12_288 + 4 * 6_144 + 12 * 12_288 // 4 + 4),
    # ZeRO-3, N=4, bf16: everything / 4: (2 + 2 + 4 + 8) / 4 per trainable, 2 / 4 per frozen
    (3, 4, "bf16", 16 * 589_824 // 4 + 4, 2 * 589_824 // 4 + 16 * 12_288 // 4 + 4),
]


@pytest.mark.parametrize("stage,world,dtype,full_bytes,rosa_bytes", HAND)
def test_hand_computed(stage, world, dtype, full_bytes, rosa_bytes):
    kw = dict(zero_stage=stage, world_size=world, dtype=dtype, param_persistence_threshold=0)
    assert predict(FULL_768, plan(method="full", **kw)).state_bytes() == full_bytes
    assert predict(ROSA_768, plan(**kw)).state_bytes() == rosa_bytes


def test_frozen_masters_are_host_bytes_of_the_owned_layers_only():
    """bf16 ROSA keeps fp32 masters of W_f on each layer's owner (host RAM): 4 m n for the layers a
    rank owns (greedy cost balance, rosa_ds.owners), nothing for the others, nothing in fp32."""
    counts = ModelCounts(frozen=[M * N, 256 * N], groups=[[M * R, R * N, 256 * R, R * N]],
                         adapted=[(M, N), (256, N)], rank=R)
    by_rank = [predict(counts, plan(zero_stage=3, world_size=2, dtype="bf16", dp_rank=r, frozen_master=None))
               for r in (0, 1)]
    assert [b.host["base_masters"] for b in by_rank] == [4 * M * N, 4 * 256 * N]  # the big layer on rank 0
    for kw in (dict(dtype="fp32", frozen_master=None), dict(dtype="bf16", frozen_master=False)):
        assert predict(counts, plan(zero_stage=3, world_size=2, **kw)).host["base_masters"] == 0


def test_issue_example_and_paper_formula():
    """The issue's numbers: full 9,437,184 B, ROSA 2,555,904 B (+8 B of step scalars), 3.69x vs 3.92x."""
    rho = rho_of(M, N, R)
    assert rho == 48.0
    full = predict(FULL_768, plan(method="full")).state_bytes() - 4
    rosa = predict(ROSA_768, plan()).state_bytes() - 8
    assert (full, rosa) == (9_437_184, 2_555_904)
    assert exact_reduction(rho, plan()) == pytest.approx(4 * rho / (rho + 4)) == pytest.approx(full / rosa)
    assert round(full / rosa, 2) == 3.69 and round(paper_reduction(rho), 2) == 3.92


@pytest.mark.parametrize("stage,dtype,world,expected", [
    (0, "fp32", 1, lambda r: 4 * r / (r + 4)),
    (1, "bf16", 1, lambda r: 8 * r / (r + 8)),
    (2, "bf16", 8, None),  # (2 + 14/8) rho / (2 rho + 2 + 14/8)
    (3, "bf16", 64, lambda r: 8 * r / (r + 8)),
    (3, "fp32", 64, lambda r: 4 * r / (r + 4)),  # CUDA: fp32 ZeRO-3 reuses the partition as master
])
def test_closed_forms(stage, dtype, world, expected):
    rho = 48.0
    p = plan(zero_stage=stage, dtype=dtype, world_size=world)
    if (stage, dtype, world) == (2, "bf16", 8):
        want = (2 + 14 / 8) * rho / (2 * rho + 2 + 14 / 8)
    else:
        want = expected(rho)
    assert exact_reduction(rho, p) == pytest.approx(want)


def test_closed_form_agrees_with_predict_on_large_matrix():
    """coefficients() is the many-parameter limit of predict(): 64 matrices 1024x1024, R = 16
    (ZeRO-2 holds whole gradients of the parameters straddling a partition boundary: ~1 %)."""
    m, r, layers = 1024, 16, 64
    full = ModelCounts(groups=[[m * m] * layers])
    rosa = ModelCounts(frozen=[m * m] * layers, groups=[[m * r, r * m] * layers])
    for stage in (0, 1, 2, 3):
        for dtype in ("fp32", "bf16"):
            for world in ((1, 8) if stage else (1,)):
                p = plan(zero_stage=stage, dtype=dtype, world_size=world, param_persistence_threshold=0,
                         reduce_bucket_size=0)
                got = predict(full, p).state_bytes() / predict(rosa, p).state_bytes()
                assert got == pytest.approx(exact_reduction(rho_of(m, m, r), p), rel=0.015), (stage, dtype, world)


def test_offload_moves_optimizer_to_host_and_rosa_saves_little_on_device():
    p = plan(zero_stage=2, world_size=4, dtype="bf16", offload_optimizer=True)
    b = predict(ROSA_768, p)
    assert b.device["master_weights"] == b.device["optimizer_states"] == 0
    assert b.host["master_weights"] == 4 * 12_288 // 4
    assert exact_reduction(48.0, p, "device") == pytest.approx(48 / 49)  # weights only: rho / (rho + 1)


def test_zero_padding_and_partitions():
    assert padded(2550, 2) == 2552 and padded(7, 4) == 8
    sizes = [90] * 3  # partitions of 136: rank 0 holds params 0,1 (the second straddles), rank 1 params 1,2
    assert zero2_grad_partition(sizes, 2, 0) == 180 and zero2_grad_partition(sizes, 2, 1) == 180


def test_adamw8bit_states():
    p = plan(zero_stage=1, optimizer="adamw8bit")
    big = ModelCounts(groups=[[8192]])
    assert predict(big, p).total("optimizer_states") == 2 * 8192 + 2 * 4 * 32 + 2 * 256 * 4
    assert predict(ModelCounts(groups=[[100]]), p).total("optimizer_states") == 800  # < 4096: 32-bit


def test_counts_simulation_equals_applied_model():
    """counts_from_module on the plain model predicts exactly what apply_rosa produces."""
    model = tiny_model("gpt2")
    sim = counts_from_module(model, "rosa", 4)
    apply_rosa(model, RosaConfig(rank=4))
    real = counts_from_module(model)
    assert (sim.frozen, sim.groups, sim.adapted) == (real.frozen, real.groups, real.adapted)
    assert sim.n_frozen + sim.n_trainable - 4 * sum(m + n for m, n in sim.adapted) == \
        counts_from_module(tiny_model("gpt2"), "full").n_trainable


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_counts_and_prediction(kind):
    """--quantize-base: each adapted weight leaves the frozen parameters for packed buffers (own
    category, byte-exact against the live module's storage) and an fp32 host master of m n."""
    pytest.importorskip("bitsandbytes")
    from rosa_ds.inject import iter_rosa_layers

    model = tiny_model("gpt2")
    sim = counts_from_module(model, "rosa", 4, quantize_base=kind)
    plain = counts_from_module(tiny_model("gpt2"), "rosa", 4)
    apply_rosa(model, RosaConfig(rank=4, quantize_base=kind))
    real = counts_from_module(model)
    assert (sim.frozen, sim.groups, sim.buffers, sim.quantized, sim.masters) == \
        (real.frozen, real.groups, real.buffers, real.quantized, real.masters)
    assert sim.n_frozen + sum(sim.masters) == plain.n_frozen and sim.buffers == plain.buffers
    stored = sum(b.numel() * b.element_size() for _, l in iter_rosa_layers(model) for b in l.base_layer.buffers())
    out = predict(sim, plan(dtype="fp32"))
    assert out.device["quantized_weights"] == stored
    assert out.host["base_masters"] == 4 * sum(m * n for m, n in sim.adapted)
    assert out.device["frozen_weights"] == 4 * sim.n_frozen
    with pytest.raises(ValueError, match="quantize_base applies to method rosa only"):
        counts_from_module(tiny_model("gpt2"), "lora", 4, quantize_base=kind)


def test_counts_on_meta_device():
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=100))
    c = counts_from_module(model, "lora", 8)
    assert len(c.adapted) == 14 and c.n_trainable == sum(8 * (m + n) for m, n in c.adapted)


@pytest.mark.parametrize("kw,msg", [
    ({"world_size": 0}, "world_size"), ({"dtype": "fp8"}, "dtype"), ({"zero_stage": 4}, "zero_stage"),
    ({"method": "dora"}, "method"), ({"optimizer": "adagrad"}, "optimizer"), ({"rank": 0}, "rank"),
    ({"offload_optimizer": True, "zero_stage": 0}, "offload"),
])
def test_bad_plan(kw, msg):
    with pytest.raises(ValueError, match=msg):
        plan(**kw)


def test_rank_too_large():
    with pytest.raises(ValueError, match="too large"):
        counts_from_module(tiny_model("gpt2"), "rosa", 32)
    with pytest.raises(ValueError, match="too large"):
        rho_of(8, 8, 8)


def test_compare_and_report(tmp_path):
    pred = predict(ROSA_768, plan())
    meas = MemoryBreakdown.from_dict(pred.to_dict())
    meas.device["gradients"] += 1
    rows = compare(pred, meas)
    assert all(r.ok for r in rows) and any(r.rel_error > 0 for r in rows)
    data = write_memory_report(tmp_path, pred, meas, plan())
    assert json.loads((tmp_path / "memory_report.json").read_text())["comparison"][2]["measured"] == \
        data["comparison"][2]["measured"]
    assert "| gradients |" in (tmp_path / "memory_report.md").read_text()


LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "max_position_embeddings": 4096}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rosa_ds.memory", *args], capture_output=True, text=True,
                          timeout=300)


# Runs the planner in a fresh interpreter that prints its OWN peak RSS at exit: VmHWM of its own
# address space. Not RUSAGE_CHILDREN (the largest child pytest ever waited for, e.g. a 2 GB
# DeepSpeed rank) and not RUSAGE_SELF (Linux keeps the high-water mark across exec, so a child
# forked from a large pytest process reports the parent's size).
_SELF_RSS = ("import sys, runpy; sys.argv = ['rosa_ds.memory'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('rosa_ds.memory', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
             "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
             "print('MAXRSS_KIB', hwm)\nsys.exit(code)")


def test_cli_plans_llama_7b_fast_and_small(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_7B))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _SELF_RSS, "--model", str(cfg), "--method", "rosa", "--rank", "16",
                           "--zero", "3", "--world-size", "64", "--dtype", "bf16", "--micro-batch", "4",
                           "--seq-len", "2048", "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    rss_gb = int(proc.stdout.split("MAXRSS_KIB")[-1].split()[0]) / 2**20  # KiB -> GiB
    assert elapsed < 120 and rss_gb < 1.0, (elapsed, rss_gb)
    data = json.loads((tmp_path / "p.json").read_text())
    full = sum(data["full"]["device"][c] for c in ("trainable_weights", "gradients", "master_weights",
                                                   "optimizer_states"))
    assert full == pytest.approx(16 * 6_738_415_616 / 64, rel=1e-3)  # Llama-7B params, 16 B each over 64 ranks


@pytest.mark.parametrize("args,msg", [
    (["--world-size", "0"], "world_size"), (["--dtype", "fp8"], "dtype"), (["--zero", "5"], "zero_stage"),
    (["--rank", "4096"], "too large"),
])
def test_cli_bad_input(tmp_path, capsys, args, msg):
    from rosa_ds.memory.__main__ import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**LLAMA_7B, "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
                               "num_attention_heads": 4, "num_key_value_heads": 4}))
    assert main(["--model", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_run_report_plans_like_preflight(checkpointing, monkeypatch):
    """The run's memory report predicts for the plan the preflight checked (``RunSpec.memory``,
    built once by ``preflight.run_plan``), so a --gradient-checkpointing run's report predicts
    activations with checkpointing."""
    from types import SimpleNamespace

    from rosa_ds.ds.config import load_template
    from rosa_ds.recipe import memory_report
    from rosa_ds.recipe.config import parse_args
    from rosa_ds.recipe.methods import method_of
    from rosa_ds.recipe.preflight import run_plan

    cfg = parse_args(["--gradient-checkpointing"] if checkpointing else [])
    ds_config, _ = load_template("zero2")
    plan = run_plan(cfg, ds_config, 2, "cpu", dp_rank=1)
    assert plan.activation_checkpointing is checkpointing
    predicted = []
    monkeypatch.setattr(memory_report, "regather_persistent", lambda module: 0)
    monkeypatch.setattr(memory_report, "counts_from_engine", lambda ds: SimpleNamespace())
    monkeypatch.setattr(memory_report, "measure", lambda ds: SimpleNamespace(to_dict=dict))
    monkeypatch.setattr(memory_report, "predict", lambda counts, p, point: predicted.append(p))
    spec = SimpleNamespace(memory=plan, rank=1, method=method_of(cfg.method))
    assert memory_report.write_run_report(spec, SimpleNamespace(ds=SimpleNamespace(module=None))) == {}
    assert predicted == [plan]
