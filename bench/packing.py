"""Padding in the default job's batches, padded vs ``--pack``, beside the timed runs.

    python -m bench.run --suite pack   # the timed runs (bench/results/pack.json, pack.md)
    python -m bench.packing            # padding from the data + the runs -> bench/results/pack_notes.md

For each variant (BBC headlines as prompt/target, and as conversations with ``--chat``): samples,
training rows (samples, or packs), optimizer steps per epoch and the share of the tokens the model
computes on that are padding, over every rank's micro batches of epoch 0 (each micro batch is as
wide as its longest row, as the collators make it). Throughput of a run = real (non-pad) tokens
trained over the seconds of its training epochs (pack.json: epoch 0's real tokens, as counted here,
times the epochs, over the sum of ``epoch_train_seconds``).
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.hardware import describe
from rosa_ds.recipe.config import TrainConfig
from rosa_ds.recipe.data import BatchOrder, PackedSplit, check_data, tokenize_data
from rosa_ds.recipe.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

WORLD = 2  # the default job's ranks


def padding(cfg: TrainConfig, tokenizer) -> dict:
    data = tokenize_data(check_data(cfg.data), tokenizer)
    rows = PackedSplit(data.train, cfg.data.seq_len) if cfg.data.pack else data.train
    lengths = [len(rows[i]["input_ids"]) for i in range(len(rows))]
    computed = real = 0
    for rank in range(WORLD):
        order = BatchOrder(len(rows), cfg.micro_batch, WORLD, rank, cfg.grad_accum, cfg.seed)
        for batch in order.micro_batches(0):
            widths = [lengths[i] for i in batch]
            computed += max(widths) * len(widths)
            real += sum(widths)
    return {"samples": len(data.train), "rows": len(rows), "steps_per_epoch": order.steps_per_epoch,
            "real_tokens": real, "computed_tokens": computed, "padding_share": round(1 - real / computed, 4)}


def throughput(pad: dict, run: dict) -> dict:
    """Real tokens per second of training: every epoch trains the same rows, so epoch 0's count holds."""
    seconds = sum(run["epoch_train_seconds"])
    tokens = pad["real_tokens"] * len(run["epoch_train_seconds"])
    return {"train_tokens": tokens, "train_seconds": round(seconds, 1), "tokens_per_s": tokens / seconds}


def row(name: str, pad: dict, run: dict) -> str:
    t = throughput(pad, run)
    return (f"| {name} | {pad['samples']} | {pad['rows']} | {pad['steps_per_epoch']} | {run['epoch_steps']} | "
            f"{pad['padding_share']:.1%} | {t['tokens_per_s']:.0f} | {run['step_seconds_median']:.2f} | "
            f"{t['train_seconds']:.0f} | {run['eval_loss_start']:.3f} → {run['eval_loss_final']:.3f} | "
            f"{run['wall_seconds']:.0f} |")


def main() -> None:
    tokenizer = load_tokenizer("default")
    pads = {}
    for name, flags in {"padded": {}, "packed": {"pack": True}, "packed-mb1": {"pack": True, "micro_batch": 1},
                        "padded-s1": {"seed": 1}, "packed-mb1-s1": {"pack": True, "micro_batch": 1, "seed": 1},
                        "chat-padded": {"chat": True},
                        "chat-packed": {"chat": True, "pack": True}}.items():
        pads[name] = padding(TrainConfig.from_flat(flags), tokenizer)
        print(name, pads[name])
    results = ROOT / "bench" / "results"
    record = {"hardware": describe(), "variants": pads}  # the machine and the code commit counted on
    (results / "pack_padding.json").write_text(json.dumps(record, indent=2) + "\n")
    runs = {r["name"]: r for r in json.loads((results / "pack.json").read_text())["runs"]}
    lines = ["| run | samples | rows | steps/epoch (planned) | steps per epoch (run) | padding share of computed "
             "tokens | tokens/s (real) | step s (median) | training s | held-out loss start → final | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(name, pads[name], runs[name]) for name in pads if runs.get(name, {}).get("returncode") == 0]
    (results / "pack_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
