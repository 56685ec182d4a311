"""One rank of the GPU verdict's speed and memory check: a model of ``bench/gpu/models.py`` (on a
GPU the 2-layer Llama-7B-shaped one) with ROSA (R = 8) under ZeRO-2 bf16 on the accelerator.

    launched by the driver: --model llama-7b-2layer --seq-len 1024 --micro-batch 1 --result out.json

Records: synchronized step time and tokens/s over the timed steps (after 2 warm-up steps),
achieved model TFLOP/s (6 N per token, N all parameters: the PaLM convention, which counts the
frozen weights' weight-gradient FLOPs ROSA does not spend) and MFU against the GPU's dense bf16
peak where known; the device's peak allocated and reserved bytes beside the accountant's
prediction of the step's peak; the resample's time per layer with every adapted weight given a
heavy-tailed spectrum (its columns scaled by a power law) before the first factorization.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rosa_ds
from bench.gpu.models import build
from rosa_ds import RosaConfig
from rosa_ds.ds.census import counts_from_engine
from rosa_ds.ds.dist import device, run_peak_bytes, shutdown_distributed, synchronize
from rosa_ds.inject import find_targets, iter_rosa_layers
from rosa_ds.memory import MemoryPlan, predict
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config

ROOT = Path(__file__).resolve().parents[2]

ROSA = RosaConfig(rank=8, seed=7)
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # FLOP/s, no sparsity


@torch.no_grad()
def heavy_tailed(model) -> None:
    """Scale each adapted weight's columns by (j + 1)^-0.75 in a random order: a power-law
    spectrum, the hard case for the solver's tail refinement, at the cost of one multiply."""
    g = torch.Generator().manual_seed(3)
    for _, module in find_targets(model, ROSA):
        n = module.weight.shape[1]
        scale = (torch.arange(n, dtype=torch.float32) + 1) ** -0.75
        module.weight.mul_(scale[torch.randperm(n, generator=g)].to(module.weight.device))


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


def timed_steps(engine, ids: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    losses = []
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    synchronize()
    return time.perf_counter() - start, [float(x) for x in losses]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-7b-2layer")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    model = build(a.model)
    heavy_tailed(model)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = ds_test_config(2, "bf16", micro_batch=a.micro_batch)
    engine = rosa_ds.initialize(model, ROSA, config=cfg)
    vocab = engine.module.config.vocab_size
    ids = torch.randint(0, vocab, (a.micro_batch, a.seq_len), generator=torch.Generator().manual_seed(0)).to(device())
    timed_steps(engine, ids, 2)  # warm-up: allocator, kernels, optimizer state
    seconds, losses = timed_steps(engine, ids, a.steps)
    tokens_per_s = a.steps * a.micro_batch * a.seq_len / seconds
    out = {"model": a.model, "params": n_params, "device": str(device()), "losses": losses,
           "step_seconds": seconds / a.steps, "tokens_per_s": tokens_per_s,
           "model_tflops": 6 * n_params * tokens_per_s / 1e12, **run_peak_bytes()}
    peak = peak_flops()
    out["mfu"] = 6 * n_params * tokens_per_s / peak if peak else None
    plan = MemoryPlan.from_ds_config(cfg, method="rosa", rank=ROSA.rank, world_size=1, micro_batch=a.micro_batch,
                                     seq_len=a.seq_len, accelerator=device().type)
    out["predicted_step_peak_bytes"] = int(predict(counts_from_engine(engine), plan, "after_step").peak_estimate())
    event = engine.resample()
    layers = sum(1 for _ in iter_rosa_layers(engine.module))
    out.update(resample_seconds=event["seconds"], resample_seconds_per_layer=event["seconds"] / layers)
    Path(a.result).write_text(json.dumps(out))
    shutdown_distributed()
    exit_now(0)


if __name__ == "__main__":
    main()
