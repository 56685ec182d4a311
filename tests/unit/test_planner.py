"""The planner: what it lists fits the budget by the accountant's own prediction, what it leaves out
does not, its flags are the trainer's, and its buffer sizes are the shipped templates'."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import transformers as tf

from rosa_ds.memory.phases import phase_peaks
from rosa_ds.memory.plan import ZERO3_AUTO, MemoryPlan
from rosa_ds.memory.planner import (
    RUNTIME_RESERVE,
    TEMPLATE_BUFFERS,
    TEMPLATES,
    Cluster,
    best_for,
    micro_batches,
    plan_cluster,
    planned_json,
    planned_markdown,
    template_buffers,
)
from rosa_ds.recipe.config import parse_args
from rosa_ds.utils.packages import package_dir

GIB = 1 << 30


def small_llama():
    return tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                          num_key_value_heads=4, vocab_size=32000)


def plan(budget, **kw):
    kw = {"global_batch": 16, "seq_len": 1024, "rank": 8, **kw}
    return plan_cluster(small_llama(), Cluster(budget, gpus_per_node=2), **kw)


def test_template_buffers_are_the_shipped_templates():
    """Every buffer size a template sets is the planner's (the ones a stage ignores are absent)."""
    names = {"reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
             "stage3_prefetch_bucket_size": "prefetch_bucket_size", "overlap_comm": "overlap_comm",
             "stage3_param_persistence_threshold": "param_persistence_threshold",
             "stage3_max_live_parameters": "max_live_parameters"}
    templates = package_dir("rosa_ds") / "ds" / "templates"
    checked = set()
    for (stage, offload), name in TEMPLATES.items():
        zero = json.loads((templates / f"{name}.json").read_text())["zero_optimization"]
        assert zero["stage"] == stage and ("offload_optimizer" in zero) == offload
        for key in zero.keys() & names.keys():
            value = ZERO3_AUTO["cpu"][key] if zero[key] == "auto" else zero[key]  # "auto": chosen by accelerator
            assert value == TEMPLATE_BUFFERS[names[key]], (name, key)
            checked.add(names[key])
    assert checked == set(TEMPLATE_BUFFERS)


def test_micro_batches_divide_the_per_rank_share():
    assert micro_batches(64, 8) == [1, 2, 4, 8]
    assert micro_batches(24, 2) == [1, 2, 4, 12]
    with pytest.raises(ValueError, match="not a multiple of the 8 ranks"):
        micro_batches(12, 8)


def test_every_listed_configuration_fits_and_every_miss_does_not():
    """Recompute each candidate's peak with the accountant: fits are within the budget, the
    closest misses are over it by the amount the table says."""
    planned = plan(3 * GIB)
    assert planned.fits and planned.misses
    for c in planned.fits + [m[0] for m in planned.misses]:
        p = MemoryPlan(method=c.method, rank=c.rank, zero_stage=c.zero_stage, world_size=2, dtype="bf16",
                       offload_optimizer=c.offload, optimizer=c.optimizer, micro_batch=c.micro_batch, seq_len=1024,
                       activation_checkpointing=c.checkpointing, **template_buffers("cuda", c.zero_stage))
        assert c.micro_batch * c.grad_accum * 2 == 16
        from rosa_ds.memory.counts import counts_from_config

        counts = counts_from_config(small_llama(), c.method, 8, quantize_base=c.quantize_base)
        device = max(v.device for v in phase_peaks(counts, p).values()) + RUNTIME_RESERVE["cuda"]
        assert device == c.device_peak
    assert all(c.device_peak <= 3 * GIB for c in planned.fits)
    assert all(over > 0 for _, over, _ in planned.misses)


def test_more_memory_never_fits_less_and_nothing_fits_a_tiny_budget():
    small, large = plan(3 * GIB), plan(12 * GIB)
    key = lambda c: (c.method, c.zero_stage, c.offload, c.micro_batch, c.checkpointing, c.optimizer,  # noqa: E731
                     c.quantize_base)
    assert {key(c) for c in small.fits} < {key(c) for c in large.fits}
    none = plan(GIB // 4)
    assert not none.fits and "Nothing fits" in planned_markdown(none, "small")


def test_host_budget_excludes_what_the_node_cannot_hold():
    no_host = plan(12 * GIB)
    tight = plan_cluster(small_llama(), Cluster(12 * GIB, gpus_per_node=2, host_budget=2 * GIB),
                         global_batch=16, seq_len=1024, rank=8)
    assert len(tight.fits) < len(no_host.fits)
    assert all(2 * c.host_peak <= 2 * GIB for c in tight.fits)


def test_best_first_prefers_exact_numerics_then_cost():
    planned = plan(12 * GIB)
    first = planned.fits[0]
    assert first.quantize_base is None and first.optimizer == "adamw"
    same_kind = [c for c in planned.fits if c.quantize_base is None and c.optimizer == "adamw"]
    assert first.seconds <= min(c.seconds for c in same_kind) * 1.02
    assert best_for(planned, "full").method == "full"


def test_checkpointing_costs_a_recompute_and_zero3_communicates_weights():
    planned = plan(64 * GIB, methods=("rosa",), quantize=())
    pick = {(c.zero_stage, c.checkpointing, c.micro_batch, c.optimizer): c for c in planned.fits}
    plain, ckpt = pick[2, False, 8, "adamw"], pick[2, True, 8, "adamw"]
    assert plain.cost["recompute"] == 0 < ckpt.cost["recompute"]
    assert pick[3, False, 8, "adamw"].cost["communication"] > 10 * plain.cost["communication"]


def test_flags_are_the_trainers():
    for c in plan(12 * GIB).fits:
        cfg = parse_args(c.flags().split() + ["--precision", "fp32"])
        assert (cfg.method, cfg.micro_batch, cfg.grad_accum, cfg.gradient_checkpointing, cfg.optim) == \
            (c.method, c.micro_batch, c.grad_accum, c.checkpointing, c.optimizer)
        assert cfg.deepspeed == c.template


def test_json_lists_fits_with_relative_cost():
    data = planned_json(plan(12 * GIB))
    assert data["fits"][0]["relative_cost"] == 1.0
    assert all(f["device_peak"] <= 12 * GIB for f in data["fits"])


def test_cpu_plan_counts_one_memory():
    """On the CPU device and host are one memory: a candidate's need is their sum."""
    planned = plan_cluster(small_llama(), Cluster(6 * GIB, gpus_per_node=2, accelerator="cpu"), global_batch=8,
                           seq_len=256, dtype="fp32", rank=8, methods=("rosa",), quantize=())
    assert planned.fits and all(c.host_peak == 0 and not c.offload for c in planned.fits)
    c = planned.fits[0]
    p = replace(MemoryPlan(method="rosa", rank=8, zero_stage=c.zero_stage, world_size=2, dtype="fp32",
                           micro_batch=c.micro_batch, seq_len=256, activation_checkpointing=c.checkpointing,
                           accelerator="cpu", **TEMPLATE_BUFFERS))
    from rosa_ds.memory.counts import counts_from_config

    peaks = phase_peaks(counts_from_config(small_llama(), "rosa", 8), p)
    assert c.device_peak == max(v.total() for v in peaks.values()) + RUNTIME_RESERVE["cpu"]
