"""One rank of ``bench/gpu_check.py``'s engine check: a tiny GPT-2 through rosa_ds.initialize on the
accelerator, two steps, a resample, a checkpoint round trip; writes what it saw as JSON.

    python -m bench.gpu_engine_rank --stage 3 --dtype bf16 --result out.json   (via launch_ranks)

Checks (each a JSON field the caller asserts): the resample preserves the logits (to the rounding
of the stored W_f), every factor's module value is its fp32 master rounded, the factors' optimizer
state is empty after the resample, a forced fp16 overflow is skipped and not counted as a step,
a checkpoint reloaded into a fresh engine gives the same next loss bit for bit, and the training
step's peak accelerator memory beside the accountant's prediction.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

import rosa_ds
from rosa_ds import RosaConfig
from rosa_ds.ds.census import counts_from_engine
from rosa_ds.ds.dist import PeakMemory, device, shutdown_distributed
from rosa_ds.ds.optim import factor_state
from rosa_ds.ds.params import full_fp32, gathered
from rosa_ds.inject import iter_rosa_layers
from rosa_ds.memory import MemoryPlan, predict
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config, lm_batch, no_dropout_gpt2


def build(stage: int, dtype: str):
    torch.manual_seed(1234)
    cfg = ds_test_config(stage, dtype, micro_batch=2)
    return rosa_ds.initialize(no_dropout_gpt2(), RosaConfig(rank=3, seed=7), config=cfg), cfg


def batch(step: int) -> dict:
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    return {k: v.to(device()) for k, v in lm_batch(step, world, 2, rank).items()}


def train_step(engine, step: int, scale: float = 1.0) -> float:
    engine.train()
    loss = engine(**batch(step)).loss
    engine.backward(loss * scale)
    engine.step()
    return float(loss.detach().float())


@torch.no_grad()
def logits(engine) -> torch.Tensor:
    engine.eval()
    return engine(**batch(99)).logits.float().cpu()


def factors_equal_masters(engine) -> bool:
    ok = True
    for _, layer in iter_rosa_layers(engine.module):
        a32 = full_fp32(layer.rosa_A)
        with gathered([layer.rosa_A]):
            ok &= bool(torch.equal(layer.rosa_A, a32.to(layer.rosa_A.dtype)))
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--dtype", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    engine, cfg = build(a.stage, a.dtype)
    out = {"stage": a.stage, "dtype": a.dtype}
    peak = PeakMemory()
    out["losses"] = [train_step(engine, 0)]
    out.update(peak.read("train_step"))
    plan = MemoryPlan.from_ds_config(cfg, method="rosa", rank=3, world_size=torch.distributed.get_world_size(),
                                     micro_batch=2, seq_len=16, accelerator=device().type)
    predicted = predict(counts_from_engine(engine), plan, "after_step")
    out["predicted_resident_bytes"] = int(sum(predicted.device.values()))
    out["predicted_peak_bytes"] = int(predicted.peak_estimate())
    if a.dtype == "fp16":  # a forced overflow: DeepSpeed skips the update; rosa_ds must not count it
        before = engine.state.applied_steps
        train_step(engine, 1, scale=1e30)
        out["overflow_skipped"] = not engine.ds.was_step_applied()
        out["overflow_not_counted"] = engine.state.applied_steps == before
    out["losses"].append(train_step(engine, 2))
    before = logits(engine)
    event = engine.resample()
    after = logits(engine)
    out["resample_seconds"] = event["seconds"]
    out["resample_peak_bytes"] = event.get("resample_peak_bytes")
    out["logits_rel_change"] = float((after - before).norm() / before.norm())
    out["factors_equal_masters"] = factors_equal_masters(engine)
    out["factor_state_empty"] = all(len(s) == 0 for s in factor_state(engine.optimizer, engine.factor_params))
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ckpt")
        expected = train_step(engine, 3)
        fresh, _ = build(a.stage, a.dtype)
        fresh.load_checkpoint(tmp, tag="ckpt")
        out["resumed_loss_equal"] = train_step(fresh, 3) == expected
    out["frozen_master"] = bool(engine.rosa_config.frozen_master)
    with open(a.result, "w") as f:
        json.dump(out, f)
    shutdown_distributed()
    exit_now(0)


if __name__ == "__main__":
    main()
