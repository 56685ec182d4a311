"""Predicted per-rank peak bytes of each phase of a run: load, training step, resample, checkpoint,
export (device and host). Pure arithmetic on the same counts as ``predict``; estimates of the
phases' working memory, stated term by term (the steady state they add to is ``predict``'s,
verified by the census):

* load: ZeRO-3 builds the model partitioned (``rosa_ds.ds.load``): the rank's partitions, plus on
  the host the largest module built whole before it is partitioned and one parameter's slice as
  read from the file. ZeRO-0/1/2: the whole model on the host (from_pretrained), then on the device
  (with ``--quantize-base`` the adapted W whole too: they are quantized there).
* step: the resident set after backward, the transient buckets, gathered ZeRO-3 parameters and
  the activation estimate (``MemoryBreakdown.peak_estimate``).
* resample: the owner's largest layer in fp32 three times (merged W, the new W_f, X V_tail or the
  SVD's U), its k x k Gram matrix and, under ZeRO-3, the gathered W_f in the weight dtype; with
  fp32 masters of W_f under ZeRO-1/2 a broadcast pack (``rosa_ds.ds.exchange.FROZEN_PACK_BYTES``)
  and, on the host, the owner's new masters before they replace the old ones.
* checkpoint: the frozen record's host copy, one chunk at a time (``CHUNK_BYTES``), and the
  largest optimizer-state tensor as torch.save copies it.
* export (the writing rank): one unit (a merged layer: W_f, A B and W in fp32); the shards are
  streamed (``rosa_ds.ds.export.ShardWriter``: header first, then each tensor as it is merged).
"""
from __future__ import annotations

from dataclasses import dataclass

from .counts import ModelCounts
from .plan import CATEGORIES, MemoryPlan
from .predict import owned_elements, predict

PHASES = ("load", "step", "resample", "checkpoint", "export")
CHUNK_BYTES = 1 << 30  # rosa_ds.ds.frozen_record.CHUNK_BYTES
FROZEN_PACK_BYTES = 1 << 28  # rosa_ds.ds.exchange.FROZEN_PACK_BYTES


@dataclass
class PhasePeak:
    """Predicted peak bytes of one phase on one rank."""

    device: int
    host: int

    def total(self) -> int:
        return self.device + self.host


def phase_peaks(counts: ModelCounts, plan: MemoryPlan) -> dict[str, PhasePeak]:
    """Per-rank peak (device, host) bytes of each phase in ``PHASES`` (see the module docstring)."""
    base = predict(counts, plan, "after_backward")
    device = sum(base.device[c] for c in CATEGORIES)
    host = sum(base.host.values())
    w, n = plan.weight_bytes, plan.world_size
    tensors = counts.frozen + [s for g in counts.groups for s in g]
    largest = max(tensors, default=0)
    m, k = max(counts.adapted, key=lambda mn: mn[0] * mn[1], default=(0, 0))
    layer = m * k
    peaks = {"step": PhasePeak(base.peak_estimate(), host)}
    weights = w * sum(tensors)
    if plan.zero_stage == 3:  # the weights' partitions (no optimizer, gradients or buckets yet)
        loaded = sum(base.device[c] for c in ("frozen_weights", "trainable_weights", "quantized_weights"))
        peaks["load"] = PhasePeak(loaded, w * largest + 4 * -(-largest // n))
    else:  # a quantized base is quantized on the device: its W arrive there whole first
        originals = w * sum(counts.masters)
        # on the CPU accelerator host and device are one memory: the model is there once
        peaks["load"] = PhasePeak(weights + originals, 0 if plan.accelerator == "cpu" else weights + originals)
    resample_dev = device + 3 * 4 * layer + 4 * min(m, k) ** 2
    resample_host = host
    if plan.zero_stage == 3:
        resample_dev += w * layer
    elif plan.keeps_frozen_masters():
        resample_dev += min(FROZEN_PACK_BYTES, w * sum(m_ * n_ for m_, n_ in counts.adapted))
        resample_host += 4 * owned_elements(counts.adapted, n, plan.dp_rank)
    peaks["resample"] = PhasePeak(resample_dev, resample_host)
    own_frozen = w * (sum(-(-s // n) for s in counts.frozen) if plan.zero_stage == 3 else sum(counts.frozen))
    state = 12 * max((sum(g) for g in counts.groups), default=0) // max(n if plan.zero_stage else 1, 1)
    peaks["checkpoint"] = PhasePeak(device, host + min(CHUNK_BYTES, own_frozen) + state)
    unit = max(w * largest, (w + 4 + 4) * layer)
    peaks["export"] = PhasePeak(device + (w * layer if plan.zero_stage == 3 else 0), host + unit)
    return {p: peaks[p] for p in PHASES}


def phases_markdown(peaks: dict[str, PhasePeak]) -> str:
    from .report import fmt_bytes

    rows = ["| phase | device | host | total |", "|---|---:|---:|---:|"]
    rows += [f"| {p} | {fmt_bytes(v.device)} | {fmt_bytes(v.host)} | {fmt_bytes(v.total())} |"
             for p, v in peaks.items()]
    return "\n".join(rows)
