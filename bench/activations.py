"""Activation census vs the accountant's prediction on three real architectures.

    python -m bench.activations      # writes bench/results/activations.{json,md}

Models: the default SmolLM2-135M (Llama-style, its real weights), GPT-2 small (124M, the
transformers default config, random weights) and the packaged MiniLM-L6 (BERT) as a 5-way
classifier; ROSA r = 8 on the default targets, fp32, one process, batch 2, at two sequence
lengths each, with and without activation checkpointing, padded batches (a padding mask).
Measured: the bytes autograd keeps for backward in one micro step (``rosa_ds.memory.activations``);
predicted: ``rosa_ds.memory.activation_terms`` for the same shape, on the CPU. The attention
implementation is transformers' default (``sdpa``) for each model.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.hardware import describe, one_line
from bench.report import save_results

ROOT = Path(__file__).resolve().parents[1]

B, RANK = 2, 8
MiB = 2**20


def models():
    """(name, build(), classification, sequence lengths)."""
    import transformers as tf

    from rosa_ds.recipe.models import load_model_and_tokenizer

    def smollm():
        return load_model_and_tokenizer("default")[0]

    def gpt2():
        torch.manual_seed(0)
        return tf.GPT2LMHeadModel(tf.GPT2Config())

    def minilm():
        return load_model_and_tokenizer("default", task="classification", num_labels=5,
                                        label_names=[str(i) for i in range(5)])[0]

    return [("SmolLM2-135M (llama)", smollm, False, (256, 1024)), ("GPT-2 124M (gpt2)", gpt2, False, (256, 1024)),
            ("MiniLM-L6 (bert)", minilm, True, (128, 512))]


def one(build, classification: bool, seq: int, checkpointing: bool) -> dict:
    from rosa_ds import RosaConfig
    from rosa_ds.inject import apply_rosa
    from rosa_ds.layer import RosaLinear
    from rosa_ds.memory.activation_terms import predict_activations
    from rosa_ds.memory.activations import measure_activations
    from rosa_ds.memory.counts import arch_from_config
    from rosa_ds.recipe.models import enable_activation_checkpointing

    model = build()
    keep = ("classifier",) if classification else ()
    apply_rosa(model, RosaConfig(rank=RANK, modules_to_save=keep))
    if checkpointing:
        enable_activation_checkpointing(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # a padded batch, as the trainer's are
    labels = torch.tensor([0, 1]) if classification else ids.masked_fill(mask == 0, -100)
    start = time.perf_counter()
    census = measure_activations(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    arch = arch_from_config(model.config, classification=classification)
    targets = sum(isinstance(m, RosaLinear) for m in model.modules()) // arch.layers
    pred = predict_activations(arch, B, seq, 4, rank=RANK, targets=targets, checkpointing=checkpointing,
                               accelerator="cpu", masked=True)
    return {"seq_len": seq, "checkpointing": checkpointing, "attention": arch.attention, "measured": census.total,
            "predicted": pred.saved, "recompute_predicted": pred.recompute, "terms": pred.terms,
            "census": census.to_dict(), "rel_error": pred.saved / census.total - 1,
            "seconds": round(time.perf_counter() - start, 2)}


def markdown(r: dict) -> str:
    lines = ["# Activations: census vs prediction", "",
             f"Machine: {one_line(r['hardware'])}. Command: `python -m bench.activations`. ROSA r = {RANK}, fp32, "
             f"batch {B} (one sequence half padding), one process. Measured: bytes autograd keeps for backward in "
             "one micro step (saved-tensor hooks, deduplicated by storage); predicted: "
             "`rosa_ds.memory.activation_terms`. With checkpointing, backward adds one layer's recompute "
             "(predicted column) on top of what is kept.", "",
             "| model | attention | seq | checkpointing | measured MiB | predicted MiB | error | + recompute MiB |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for name, rows in r["models"].items():
        for x in rows:
            lines.append(f"| {name} | {x['attention']} | {x['seq_len']} | {'yes' if x['checkpointing'] else 'no'} | "
                         f"{x['measured'] / MiB:.2f} | {x['predicted'] / MiB:.2f} | {100 * x['rel_error']:+.2f} % | "
                         f"{x['recompute_predicted'] / MiB:.2f} |")
    worst = max(abs(x["rel_error"]) for rows in r["models"].values() for x in rows)
    lines += ["", f"Largest error: {100 * worst:.2f} % (target: within 10 %)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    start, out = time.perf_counter(), {}
    for name, build, cls, seqs in models():
        out[name] = [one(build, cls, s, ck) for s in seqs for ck in (False, True)]
        print(name, [f"{x['rel_error']:+.4f}" for x in out[name]], flush=True)
    result = {"hardware": describe(), "models": out, "seconds": time.perf_counter() - start}
    save_results(ROOT / "bench" / "results", "activations", result, markdown(result))


if __name__ == "__main__":
    main()
