"""Padding collator: a list of samples -> one right-padded batch of tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import ConfigError
from .encode import IGNORE_INDEX


@dataclass
class PadCollator:
    """Pad to the longest sample in the batch (optionally up to a multiple), on the right.

    Returns ``input_ids`` [B, L] (pads = ``pad_token_id``), ``attention_mask`` [B, L] (1 = real
    token) and ``labels``: [B, L] with -100 on pads for causal LM, or [B] class ids.
    Right padding keeps every sample's positions 0..len-1, so position ids match unpadded runs.

    Attributes:
        pad_token_id: id written into padded positions (masked out; its value does not matter).
        pad_to_multiple_of: round L up to a multiple of this (e.g. 8 for tensor cores); None: no rounding.
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ConfigError("PadCollator.pad_token_id is None; set tokenizer.pad_token (e.g. to eos) first")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"PadCollator.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        per_token = not isinstance(features[0]["labels"], int)
        labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long) if per_token else \
            torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        for row, (x, f) in enumerate(zip(ids, features)):
            input_ids[row, :len(x)] = x
            attention_mask[row, :len(x)] = 1
            if per_token:
                labels[row, :len(x)] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_tokens(batch: dict) -> int:
    """Real (non-pad) tokens of a host batch; pops a packed batch's ``num_tokens`` (not a model input)."""
    counted = batch.pop("num_tokens", None)
    if counted is not None:
        return int(counted)
    return int(batch["attention_mask"].sum())
