"""One rank of the memory-accountant check: for each case build a tiny model, initialize
DeepSpeed the way the ROSA engine does, take one optimizer step plus one more backward, then
write the census (measured) next to the prediction for this rank.

Case syntax: ``stage:dtype:method[:optimizer[:offload|nf4|int8]]``, e.g. ``2:bf16:rosa``,
``2:fp32:full:adamw8bit``, ``2:fp32:rosa:adamw:offload`` or ``2:fp32:rosa:adamw:nf4`` (ROSA with
a quantized base: packed W_f buffers and fp32 host masters are their own categories).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
import transformers as tf

from rosa_ds import RosaConfig, apply_rosa
from rosa_ds.ds.census import counts_from_engine, measure
from rosa_ds.layer import is_adapter_param
from rosa_ds.memory import MemoryPlan, compare, counts_from_module, predict

RANK_R = 3  # odd sizes everywhere, so padding and partition boundaries are exercised
BUCKETS = {"reduce_bucket_size": 1000, "allgather_bucket_size": 1000, "stage3_prefetch_bucket_size": 500,
           "stage3_param_persistence_threshold": 40, "stage3_max_live_parameters": 4000,
           "stage3_max_reuse_distance": 4000, "overlap_comm": False, "contiguous_gradients": True}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=30, intermediate_size=45, num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, max_position_embeddings=32, vocab_size=127)
    return tf.LlamaForCausalLM(cfg)


def build(method: str, quantize: str | None = None):
    """(model, param groups, counts predicted from the plain model) as the engine builds them."""
    model = tiny_llama()
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if method == "full":
        return model, [{"params": list(model.parameters())}], counts_from_module(model, "full")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        counts = counts_from_module(model, "lora", RANK_R, targets)
        model = get_peft_model(model, LoraConfig(r=RANK_R, target_modules=list(targets), lora_dropout=0.0))
        return model, [{"params": [p for p in model.parameters() if p.requires_grad]}], counts
    config = RosaConfig(rank=RANK_R, target_modules=targets, modules_to_save=("norm",), quantize_base=quantize)
    counts = counts_from_module(model, "rosa", RANK_R, targets, ("norm",), quantize_base=quantize)
    apply_rosa(model, config)
    applied = counts_from_module(model)
    assert (applied.frozen, applied.groups, applied.buffers, applied.quantized, applied.masters) == (
        counts.frozen, counts.groups, counts.buffers, counts.quantized, counts.masters), "simulated ROSA counts differ"
    factors = [p for n, p in model.named_parameters() if is_adapter_param(n)]
    kept = [p for n, p in model.named_parameters() if p.requires_grad and not is_adapter_param(n)]
    return model, [{"params": factors}] + ([{"params": kept}] if kept else []), counts


def ds_config(stage: int, dtype: str, optimizer: str, offload: bool = False) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage, **BUCKETS}, "bf16": {"enabled": dtype == "bf16"},
           "zero_allow_untested_optimizer": True}
    if offload:  # ZeRO-Offload insists on DeepSpeedCPUAdam (torch_adam false)
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if optimizer == "adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": not offload}}
    return cfg


def run_case(case: str, rank: int, world: int, report_dir: str = "") -> dict:
    stage, dtype, method, *rest = case.split(":")
    stage, optimizer, offload = int(stage), (rest[0] if rest else "adamw"), "offload" in rest
    quantize = next((r for r in rest if r in ("nf4", "int8")), None)
    model, groups, counts = build(method, quantize)
    if method == "rosa" and dtype == "bf16" and quantize is None:  # as rosa_ds.initialize does in bf16
        from rosa_ds.ds.engine import place_masters

        place_masters(model, mastered=True)  # fp32 masters of W_f on each layer's owner rank
    client = None
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        client = bnb.optim.AdamW8bit(groups, lr=1e-3)
    from rosa_ds.ds.dist import init_distributed

    init_distributed()  # gloo on CPU, without JIT-building the shm op
    engine, *_ = deepspeed.initialize(model=model, model_parameters=None if client else groups, optimizer=client,
                                      config=ds_config(stage, dtype, optimizer, offload))
    x = torch.randint(0, 127, (2, 12), generator=torch.Generator().manual_seed(rank))
    for i in range(2):  # step once (optimizer state exists), then one more backward: the resident peak set
        engine.backward(engine(input_ids=x, labels=x).loss)
        if i == 0:
            engine.step()
    plan = MemoryPlan.from_ds_config(ds_config(stage, dtype, optimizer, offload), method=method, rank=RANK_R,
                                     world_size=world, optimizer=optimizer, accelerator="cpu", dp_rank=rank,
                                     seq_len=12, micro_batch=2)
    predicted, measured = predict(counts, plan), measure(engine)
    rows = compare(predicted, measured)
    live = counts_from_engine(engine)  # what the trainer's report uses: must agree with the plain-model counts
    engine.step()  # second census after the step: gradients of stage 0-2 are freed
    rows_after = compare(predict(counts, plan, "after_step"), measure(engine))
    persist = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False)]
    if persist:  # a checkpoint save / resample partitions persistent params; the report must re-gather them
        from rosa_ds.ds.census import regather_persistent

        with deepspeed.zero.GatheredParameters(persist):
            pass
        dropped = sum(measure(engine).device.values())
        regathered = regather_persistent(engine.module)
        out_regather = [dropped, regathered, sum(measure(engine).device.values())]
    out = {"case": case, "predicted": predicted.to_dict(), "measured": measured.to_dict(),
           "rows": [[r.category, r.predicted, r.measured, r.ok] for r in rows],
           "rows_after_step": [[r.category, r.predicted, r.measured, r.ok] for r in rows_after],
           "engine_counts_match": (live.frozen, live.groups, live.buffers, live.quantized, live.masters) == (
               counts.frozen, counts.groups, counts.buffers, counts.quantized, counts.masters),
           "regather": out_regather if persist else None,
           "rho": counts.rho, "n_trainable": counts.n_trainable, "n_frozen": counts.n_frozen}
    if report_dir:  # the run's report, for a duck-typed run spec, after the step
        from types import SimpleNamespace

        from rosa_ds.recipe.memory_report import write_run_report
        from rosa_ds.recipe.methods import method_of
        from rosa_ds.recipe.preflight import run_plan

        cfg = SimpleNamespace(method=method, rosa=SimpleNamespace(rank=RANK_R, frozen_master=None), micro_batch=2,
                              data=SimpleNamespace(seq_len=12), optim=optimizer, gradient_checkpointing=False)
        plan = run_plan(cfg, ds_config(stage, dtype, optimizer, offload), world, "cpu", dp_rank=rank)
        spec = SimpleNamespace(memory=plan, rank=rank, out=Path(report_dir), method=method_of(method))
        report = write_run_report(spec, SimpleNamespace(ds=engine))
        out["run_report_ok"] = all(r["ok"] for r in report["comparison"]) if rank == 0 else None
    engine.destroy() if hasattr(engine, "destroy") else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="comma-separated stage:dtype:method[:optimizer]")
    ap.add_argument("--result", required=True)
    ap.add_argument("--report-dir", default="", help="also write the trainer's memory report for the first case")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cases = args.cases.split(",")
    results = [run_case(c, rank, world, args.report_dir if i == 0 else "") for i, c in enumerate(cases)]
    with open(args.result, "w") as f:
        json.dump({"rank": rank, "cases": results}, f)


if __name__ == "__main__":
    main()
    from rosa_ds.ds.dist import shutdown_distributed
    from rosa_ds.utils.dist import exit_now

    shutdown_distributed()
    exit_now(0)
