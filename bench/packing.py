"""Padding in the default job's batches, padded vs ``--pack``: computed from the data, no training.

    python bench/packing.py          # writes bench/results/pack_padding.json and prints a table

For each variant (BBC headlines as prompt/target, and as conversations with ``--chat``): samples,
training rows (samples, or packs), optimizer steps per epoch and the share of the tokens the model
computes on that are padding, over every rank's micro batches of epoch 0 (each micro batch is as
wide as its longest row, as the collators make it). The timed runs are ``bench/run.py --suite pack``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rosa_ds.recipe.config import TrainConfig  # noqa: E402
from rosa_ds.recipe.data import BatchOrder, PackedSplit, check_data, tokenize_data  # noqa: E402
from rosa_ds.recipe.models import load_tokenizer  # noqa: E402

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


def main() -> None:
    tokenizer = load_tokenizer("default")
    out = {}
    for name, flags in {"padded": {}, "packed": {"pack": True}, "chat-padded": {"chat": True},
                        "chat-packed": {"chat": True, "pack": True}}.items():
        out[name] = padding(TrainConfig.from_flat(flags), tokenizer)
        print(name, out[name])
    path = ROOT / "bench" / "results" / "pack_padding.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
