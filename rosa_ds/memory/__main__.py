"""Planning CLI: per-rank memory of full / LoRA / ROSA fine-tuning for a model, from its config
alone (meta device: no weights are read or allocated).

    python -m rosa_ds.memory --model default --method rosa --rank 16 --zero 3 --world-size 64 \
        --dtype bf16 --micro-batch 4 --seq-len 2048 --markdown plan.md --png plan.png --json plan.json

With ``--budget`` it plans instead: every configuration that fits, best first (``planner``):

    python -m rosa_ds.memory --model bench/configs/llama-70b.json --budget 80GiB --gpus-per-node 8 \
        --nodes 2 --host-budget 1TiB --global-batch 256 --seq-len 4096
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..errors import InputNotFound, field_words
from ..utils.options import flag_name
from .counts import counts_from_config, load_config
from .ds_json import declared_dtype
from .phases import phase_peaks, phases_markdown
from .plan import MemoryPlan
from .predict import exact_reduction, paper_reduction, predict
from .report import bar_chart, breakdown_markdown, legend_markdown


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m rosa_ds.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a config.json or a dir")
    ap.add_argument("--method", default="rosa", help="method of interest: full, lora or rosa (all three are shown)")
    ap.add_argument("--rank", type=int, default=8, help="R for LoRA / ROSA")
    ap.add_argument("--targets", default=None, help="comma-separated target leaf names (default: rosa_ds defaults)")
    ap.add_argument("--zero", type=int, default=2, help="ZeRO stage 0-3")
    ap.add_argument("--world-size", type=int, default=1, help="data-parallel ranks N")
    ap.add_argument("--dtype", default="bf16", help="fp32, bf16 or fp16")
    ap.add_argument("--optimizer", default="adamw", help="adamw or adamw8bit")
    ap.add_argument("--offload", action="store_true", help="ZeRO offload_optimizer to cpu")
    ap.add_argument("--quantize-base", default=None, choices=("nf4", "int8"),
                    help="also show ROSA with W_f quantized (column rosa+nf4 / rosa+int8)")
    ap.add_argument("--accelerator", default="cuda", help="cuda or cpu (fp32 ZeRO-3 master copy differs)")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro step")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--ds-config", default=None,
                    help="DeepSpeed JSON: stage, offload and buckets from it (precision too unless 'auto')")
    ap.add_argument("--reduce-bucket-size", type=int, default=None,
                    help="ZeRO reduce_bucket_size in elements (DeepSpeed default 5e8)")
    ap.add_argument("--budget", default=None, help="plan: memory per GPU (per rank on the CPU), e.g. 80GiB")
    ap.add_argument("--gpus-per-node", type=int, default=1, help="plan: ranks per node")
    ap.add_argument("--nodes", type=int, default=1, help="plan: nodes")
    ap.add_argument("--host-budget", default=None, help="plan: host RAM per node, e.g. 1TiB")
    ap.add_argument("--global-batch", type=int, default=None, help="plan: sequences per optimizer step "
                                                                   "(default: one per rank)")
    ap.add_argument("--methods", default="rosa,lora,full", help="plan: methods to consider")
    ap.add_argument("--top", type=int, default=15, help="plan: configurations listed")
    ap.add_argument("--json", default=None, help="write the plan as JSON here")
    ap.add_argument("--markdown", default=None, help="write a Markdown report here")
    ap.add_argument("--png", default=None, help="write a stacked bar chart here")
    return ap.parse_args(argv)


def build_plan(args: argparse.Namespace) -> MemoryPlan:
    fields = dict(method=args.method, rank=args.rank, zero_stage=args.zero, world_size=args.world_size,
                  dtype=args.dtype, optimizer=args.optimizer, offload_optimizer=args.offload,
                  accelerator=args.accelerator, micro_batch=args.micro_batch, seq_len=args.seq_len,
                  activation_checkpointing=args.checkpointing)
    if args.reduce_bucket_size is not None:
        fields["reduce_bucket_size"] = args.reduce_bucket_size
    if args.ds_config:
        path = Path(args.ds_config)
        if not path.is_file():
            raise InputNotFound(f"--ds-config {path} does not exist; give a DeepSpeed JSON such as "
                                "ds_configs/zero2.json")
        ds = json.loads(path.read_text())
        fixed = ("zero_stage", "offload_optimizer") + (("dtype",) if declared_dtype(ds) else ())
        return MemoryPlan.from_ds_config(ds, **{k: v for k, v in fields.items() if k not in fixed})
    return MemoryPlan(**fields)


def plan_all(model: str, plan: MemoryPlan, targets=None, quantize_base=None) -> tuple[dict, dict]:
    """Predictions for full / lora / rosa (and rosa+<quantize_base>) under the same plan, and the
    counts behind them."""
    breakdowns, counts = {}, {}
    cfg = load_config(model)
    for method in ("full", "lora", "rosa"):
        counts[method] = counts_from_config(cfg, method, plan.rank, targets)
        breakdowns[method] = predict(counts[method], replace(plan, method=method))
    if quantize_base:
        key = f"rosa+{quantize_base}"
        counts[key] = counts_from_config(cfg, "rosa", plan.rank, targets, quantize_base=quantize_base)
        breakdowns[key] = predict(counts[key], replace(plan, method="rosa"))
    return breakdowns, counts


def render(model: str, plan: MemoryPlan, breakdowns: dict, counts: dict) -> str:
    rho = counts["rosa"].rho
    head = [f"# Memory plan: {model}", "",
            f"ZeRO-{plan.zero_stage}, N = {plan.world_size}, {plan.dtype}, optimizer {plan.optimizer}"
            f"{', optimizer offload' if plan.offload_optimizer else ''}, R = {plan.rank}, micro batch "
            f"{plan.micro_batch} x {plan.seq_len} tokens. Bytes per rank.", "",
            f"Parameters: total {counts['full'].n_trainable:,}; ROSA trainable {counts['rosa'].n_trainable:,} "
            f"({100 * counts['rosa'].n_trainable / max(counts['full'].n_trainable, 1):.3f} %), "
            f"model-wide rho = {rho:.2f}", "",
            breakdown_markdown(breakdowns), "",
            f"Exact reduction for the adapted matrices under this plan, c_t rho / (c_f rho + c_t): "
            f"**{exact_reduction(rho, plan):.2f}x** (device only: {exact_reduction(rho, plan, 'device'):.2f}x); "
            f"the paper's 4 rho / (1 + rho): {paper_reduction(rho):.2f}x. The whole-model figure in the table "
            "differs: embeddings and norms are frozen but not factorized, and padding, ZeRO-3 persistence and "
            "ZeRO-2's whole-parameter gradient slots are counted there. See docs/memory.md.", "",
            "## ROSA's peak per phase (estimates, per rank)", "",
            phases_markdown(phase_peaks(counts["rosa"], replace(plan, method="rosa"))), "",
            "## Categories", "", legend_markdown(), ""]
    return "\n".join(head)


def plan_budget(args: argparse.Namespace) -> int:
    """``--budget``: the planner's table (and JSON / Markdown files)."""
    from ..utils.sizes import parse_size
    from .planner import Cluster, plan_cluster, planned_json, planned_markdown

    t0 = time.perf_counter()
    try:
        cluster = Cluster(parse_size(args.budget), args.gpus_per_node, args.nodes,
                          parse_size(args.host_budget) if args.host_budget else None, args.accelerator)
        planned = plan_cluster(args.model, cluster, global_batch=args.global_batch or cluster.world,
                               seq_len=args.seq_len, dtype=args.dtype, rank=args.rank,
                               methods=tuple(args.methods.split(",")), attention_mask=True,
                               targets=tuple(args.targets.split(",")) if args.targets else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = planned_markdown(planned, args.model, args.top)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(planned_json(planned), indent=1))
    print(f"(planned {len(planned.fits) + len(planned.misses)} setups in {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    with field_words(own_flags(args)):
        return plan_budget(args) if args.budget else plan_one(args)


def own_flags(args: argparse.Namespace) -> Callable[[str], Optional[str]]:
    """Errors name settings by field (``rosa_ds.errors``); this CLI says those it has as its flags."""
    return lambda name: flag_name(name) if name in vars(args) else None


def plan_one(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        plan = build_plan(args)  # validated before any model is built
        targets = tuple(args.targets.split(",")) if args.targets else None
        breakdowns, counts = plan_all(args.model, plan, targets, args.quantize_base)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = render(args.model, plan, breakdowns, counts)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + (f"\n![memory chart]({Path(args.png).name})\n" if args.png else ""))
    if args.png:
        bar_chart(breakdowns, args.png, f"{args.model}: ZeRO-{plan.zero_stage}, N={plan.world_size}, "
                                        f"{plan.dtype}, R={plan.rank}, b={plan.micro_batch}, s={plan.seq_len}")
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan.to_dict(), "rho": counts["rosa"].rho,
                                               **{k: b.to_dict() for k, b in breakdowns.items()}}, indent=2))
    print(f"(planned in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
