"""Scoring the held-out split during training: the mean loss over every scored item of the split
(tokens for a causal LM, samples for classification: ``Task.scored``), plus what the task adds
(generated samples; accuracy, macro-F1 and the predictions file).

Every rank takes a strided shard (rank r scores samples r, r + N, ...) and all run the same number
of forwards, a throwaway batch where a shard is short, because ZeRO-3 gathers parameters inside
each forward and a rank that stopped early would leave the others waiting.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..ds.dist import all_gather_object, all_reduce
from ..utils.log import log_rank0
from .data import PadCollator
from .metrics import MetricsWriter, write_predictions


def to_device(batch: dict, device) -> dict:
    """A host batch's tensors on the engine's device (the loader does not pin its batches: a
    plain, synchronous copy)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def gather(values: list) -> list:
    """Every rank's ``values``, concatenated in rank order (a collective: every rank calls it)."""
    return [v for part in all_gather_object(values) for v in part]


class Evaluator:
    """Scores ``spec.data.eval`` with ``engine``; each record goes to ``metrics`` and the log."""

    def __init__(self, spec, engine, metrics: MetricsWriter) -> None:
        self.spec, self.engine, self.metrics = spec, engine, metrics
        self.collate = PadCollator(spec.tokenizer.pad_token_id)  # one sample per row
        self.last: Optional[dict] = None  # the latest record (the progress bar shows its scores)

    @property
    def label_names(self) -> list:
        return self.spec.data.label_names

    def gather(self, values: list) -> list:
        return gather(values)

    @torch.no_grad()
    def evaluate(self, epoch: int) -> Optional[dict]:
        split = self.spec.data.eval
        if split is None or len(split) == 0:
            return None
        eng, task, micro = self.engine, self.spec.task, self.spec.cfg.micro_batch
        rank, world = self.spec.rank, self.spec.world
        eng.eval()
        mine = list(range(rank, len(split), world))
        loss_sum = torch.zeros(2, dtype=torch.float64, device=eng.device)  # (sum of losses, count)
        seen: dict = {}
        for start in range(0, math.ceil(len(split) / world), micro):
            idx = mine[start:start + micro] or [0]  # a throwaway batch keeps ZeRO-3 in step
            batch = self.collate([split[i] for i in idx])
            out = eng(**to_device(batch, eng.device))
            if not mine[start:start + micro]:
                continue
            n = task.scored(batch, len(idx))
            loss_sum += torch.stack([out.loss.double() * n, loss_sum.new_tensor(n)])
            task.observe(seen, out, batch, idx)
        total, count = all_reduce(loss_sum).tolist()
        loss = total / max(count, 1)
        rec = {"event": "eval", "step": eng.global_step, "epoch": epoch, "eval_loss": loss,
               "eval_perplexity": math.exp(min(loss, 50)), **task.finish(seen, self)}
        self.metrics.write(rec)
        log_rank0(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in rec.items() if k != "samples"))
        self.last = rec
        return rec

    def write_predictions(self, rows: list) -> None:
        """Every rank's (index, logits) rows, gathered: ``eval_predictions.jsonl`` (rank 0)."""
        if self.spec.rank == 0:
            write_predictions(self.spec.out / "eval_predictions.jsonl", rows, self.spec.data.eval.labels.tolist(),
                              self.label_names)

    def generate_samples(self) -> list[dict]:
        """Greedy continuations of the fixed eval prompts (all ranks run generate: ZeRO-3)."""
        prompts = self.spec.data.eval_prompts[: self.spec.cfg.data.num_samples]
        samples, module, tok = [], self.engine.module, self.spec.tokenizer
        synced = self.engine.zero_optimization_stage() == 3 and self.spec.world > 1
        for p in prompts:
            ids = torch.tensor([p.prompt_ids], device=self.engine.device)
            out = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  pad_token_id=tok.pad_token_id, synced_gpus=synced)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            samples.append({"prompt": p.prompt[-200:], "reference": p.reference, "generated": text})
        return samples
