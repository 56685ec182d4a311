"""Packing: several samples per row of at most ``seq_len`` tokens, kept apart by position ids.

A pack is a list of sample indices chosen once, deterministically, by best-fit decreasing on the
samples' lengths (longest first; each goes to the open row with the least room that fits it, ties
to the older row), so every rank builds the same packs and ``BatchOrder`` shuffles and resumes
packs exactly as it does samples. Row r of a packed micro batch of samples s_1..s_m:

    input_ids    = ids(s_1) + ... + ids(s_m)                         [L_r <= seq_len]
    position_ids = [0..len(s_1)-1] + ... + [0..len(s_m)-1]
    labels       = labels(s_j) with each sample's first label set to -100

No attention mask is passed: transformers then reads the sample boundaries from the restarting
position ids (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal
mask (sdpa, eager, flex) or variable-length kernels (flash attention). The model shifts labels
(position i predicts label i+1), so the boundary label is what would make one sample's last token
predict the next sample's first; with it at -100 the targets are exactly the unpacked targets and
the loss (transformers' mean over target tokens) equals the unpacked batch's token mean.
``check_packed_attention`` verifies the separation on the model in use.

transformers 5.23 looks for packed rows only when no KV cache is passed, and a model called with
its default ``config.use_cache=True`` makes itself a cache even in training, silently falling back
to one causal mask over the whole row (samples then attend to each other: measured, relative
logit gap 0.16 on a tiny Llama). ``prepare_packed_model`` therefore turns the cache off for the
training forward (``generate`` still uses one: it passes ``use_cache`` itself).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from .encode import IGNORE_INDEX, TokenizedSplit

# Attention implementations of transformers that keep packed samples apart given position ids.
PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def pack_samples(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Sample indices grouped into rows of total length <= ``seq_len`` (best-fit decreasing);
    each row's indices in ascending order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack id), sorted: best fit = first room >= length
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ConfigError(f"sample {i} has {n} tokens, more than seq_len {seq_len}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, pid = free.pop(at)
        else:
            room, pid = seq_len, len(packs)
            packs.append([])
        packs[pid].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, pid))
    return [sorted(p) for p in packs]


class PackedSplit(torch.utils.data.Dataset):
    """A ``TokenizedSplit`` seen as packs; item i is row i (see the module docstring)."""

    def __init__(self, split: TokenizedSplit, seq_len: int) -> None:
        if not split.per_token:
            raise ConfigError("packing needs per-token labels (causal LM), not class labels")
        self.split, self.seq_len = split, seq_len
        self.packs = pack_samples(split.lengths().tolist(), seq_len)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict:
        items = [self.split[j] for j in self.packs[i]]
        labels = [it["labels"].clone() for it in items]
        for lab in labels:
            lab[0] = IGNORE_INDEX  # would be the target of the previous sample's last token
        return {"input_ids": torch.cat([it["input_ids"] for it in items]), "labels": torch.cat(labels),
                "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items])}

    def stats(self) -> dict:
        tokens = int(self.split.lengths().sum())
        return {"packs": len(self), "samples": len(self.split),
                "fill": round(tokens / max(len(self) * self.seq_len, 1), 4)}


@dataclass
class PackCollator:
    """Packed rows -> one batch: ``input_ids``, ``labels`` and ``position_ids`` [B, L], no attention
    mask. Shorter rows are filled with pad tokens that form their own segment (positions restart at
    0, labels -100), so they neither see nor are seen by real tokens. ``num_tokens`` (a 0-d tensor,
    not a model input: the trainer pops it) counts the real tokens."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[b, :n], labels[b, :n], position_ids[b, :n] = r["input_ids"], r["labels"], r["position_ids"]
            position_ids[b, n:] = torch.arange(width - n)
        real = sum(len(r["input_ids"]) for r in rows)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "num_tokens": torch.tensor(real)}


def prepare_packed_model(model, device, tolerance: float = 1e-4) -> float:
    """Make ``model`` train on packed rows (no KV cache in forward) and verify it keeps samples apart."""
    model.config.use_cache = False
    return check_packed_attention(model, device, tolerance)


@torch.no_grad()
def check_packed_attention(model, device, tolerance: float = 1e-4) -> float:
    """Raise (one line) unless ``model`` keeps packed samples apart; returns the relative logit gap.

    Two random samples a (6 tokens) and b (5) are packed as one row with restarting position ids;
    b's logits in the row must equal b's logits alone (``tolerance``, relative to their largest
    magnitude). A mask that leaks lets b attend to a and moves them by O(1). The model is called as
    training calls it (its own ``use_cache`` setting), so a configuration that leaks is caught."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in PACKABLE_ATTENTION:
        raise ConfigError(f"--pack needs an attention implementation that keeps packed samples apart "
                          f"({', '.join(PACKABLE_ATTENTION)}); this model uses {impl!r}; fix: drop --pack")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(model.config.vocab_size, (1, n), generator=g) for n in (6, 5))
    pos = torch.cat([torch.arange(6), torch.arange(5)])[None]
    try:
        packed = model(input_ids=torch.cat([a, b], 1).to(device), position_ids=pos.to(device)).logits[0, 6:].float()
        alone = model(input_ids=b.to(device)).logits[0].float()
    finally:
        model.train(was_training)
    gap = float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-6))
    if gap > tolerance:
        raise ConfigError(f"--pack: with attention {impl!r} this model lets packed samples attend to each other "
                          f"(relative logit gap {gap:.2g} > {tolerance:g}); fix: drop --pack")
    return gap
