"""The divergence guard: ``--nan-policy`` applied to each optimizer step's record, and the check
that keeps a non-finite state out of every checkpoint and export.

A non-finite loss (any rank's: the all-reduced sum is then non-finite) or a step DeepSpeed dropped
for non-finite gradients (its overflow check is itself agreed across ranks; under fp16 such drops
are loss scaling at work and not counted) is: ``stop``, the run ends at once, nothing is saved
after it; ``skip``, the step is dropped on every rank and the run stops after ``--nan-skip-limit``
of them in a row. Every rank sees the same record, so every rank decides alike.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

from ..ds.dist import all_reduce
from ..utils.log import log_rank0
from .faults import Diverged


def trainable_finite(engine) -> bool:
    """Every rank's trainable values (its ZeRO-3 partition, or the replicated copy) are finite."""
    local = [getattr(p, "ds_tensor", p) for p in engine.module.parameters() if p.requires_grad]
    bad = sum(int(not bool(torch.isfinite(t).all())) for t in local if t.numel())
    return all_reduce(torch.tensor([float(bad)], device=engine.device)).item() == 0


class DivergenceGuard:
    """``check(rec)`` per step: None (go on; ``rec`` may gain ``skipped``), or the ``Diverged`` to
    raise once the record is written. ``last_good()`` says where a diverged run can resume from."""

    def __init__(self, policy: str, skip_limit: int, precision: str, skipped_steps: Callable[[], int],
                 last_good: Callable[[], str]) -> None:
        self.policy, self.skip_limit, self.precision = policy, skip_limit, precision
        self.skipped_steps, self.last_good = skipped_steps, last_good
        self.ds_skipped = 0  # DeepSpeed's count of dropped steps, as last seen
        self.in_row = 0
        self.skipped = 0

    def check(self, rec: dict) -> Optional[Diverged]:
        now = int(self.skipped_steps())
        dropped = now > self.ds_skipped and self.precision != "fp16"
        self.ds_skipped = now
        if math.isfinite(rec["loss"]) and not dropped:
            self.in_row = 0
            return None
        what = "loss" if not math.isfinite(rec["loss"]) else "gradients"
        last = self.last_good()
        if self.policy == "stop":
            return Diverged(f"non-finite {what} at step {rec['step']} (--nan-policy stop): nothing saved after it; "
                            f"{last}; lower --lr, or resume with --nan-policy skip")
        if not dropped:
            return Diverged(f"non-finite {what} at step {rec['step']} and DeepSpeed applied the step anyway (it drops "
                            "non-finite steps when gradient_clipping > 0 in the DeepSpeed JSON); "
                            f"{last}; set gradient_clipping, or lower --lr")
        self.in_row += 1
        self.skipped += 1
        rec.update(skipped=True, skipped_total=self.skipped)
        log_rank0(f"non-finite {what} at step {rec['step']}: step dropped on every rank "
                  f"({self.in_row} in a row, limit --nan-skip-limit {self.skip_limit})")
        if self.in_row >= self.skip_limit:
            return Diverged(f"{self.in_row} non-finite steps in a row up to step {rec['step']} "
                            f"(--nan-skip-limit {self.skip_limit}): {last}; lower --lr")
        return None
