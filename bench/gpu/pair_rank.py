"""One rank of the GPU verdict's engine run: the tiny Llama (``bench/gpu/models.py``, 4 layers, so
rank 1 owns layers in a 2-rank world) through ``rosa_ds.initialize`` on the accelerator; writes what
the driver (``bench/gpu/check.py``) compares across world sizes and with the CPU fp32 reference.

    launched by the driver: --stage 2|3 --dtype bf16|fp32 --workdir DIR --result out.json

Records: the owners of the layers; the first factorization's split error
||W_f + A B - W_0|| / ||W_0|| per layer (W_f and A, B as the fp32 masters hold them, on the rank
holding W_f's master); the losses of 3 steps; the logits' change over a resample; a checkpoint
round trip (the next loss bit for bit); the sharded export (rank 0 writes ``DIR/export``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import rosa_ds
from bench.gpu.models import build
from rosa_ds import RosaConfig
from rosa_ds.ds.dist import device, shutdown_distributed
from rosa_ds.ds.export import save_merged
from rosa_ds.ds.params import full_fp32, gathered
from rosa_ds.inject import find_targets, iter_rosa_layers
from rosa_ds.owners import assign_owners
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config, lm_batch

ROOT = Path(__file__).resolve().parents[2]

ROSA = RosaConfig(rank=4, seed=7)
SHARD_BYTES = 100_000  # several shards even for the tiny model: the index and streaming are exercised
GLOBAL_BATCH = 4  # the same 4 sequences per step whatever the world size, so the runs compare


def micro_batch() -> int:
    return GLOBAL_BATCH // torch.distributed.get_world_size()


def engine_for(stage: int, dtype: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ds_test_config(stage, dtype, micro_batch=GLOBAL_BATCH // world)
    return rosa_ds.initialize(build("tiny-llama"), ROSA, config=config)


def train_step(engine, step: int) -> float:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    engine.train()
    batch = {k: v.to(device()) for k, v in lm_batch(step, world, micro_batch(), rank).items()}
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float())


@torch.no_grad()
def logits(engine) -> torch.Tensor:
    engine.eval()
    out = engine(input_ids=lm_batch(99, 1, 2)["input_ids"].to(device())).logits.float().cpu()
    engine.settle()
    return out


def split_errors(engine, w0: dict) -> dict:
    """Per layer, on the rank holding W_f's fp32 master (every rank without masters):
    ||W_f + A B - W_0|| / ||W_0|| in fp64, (m, n) layout (collective: every rank gathers every
    factor). ``w0``: the target modules' weights before ROSA, by module name."""
    errors = {}
    for name, layer in iter_rosa_layers(engine.module):
        a, b = full_fp32(layer.rosa_A).double().cpu(), full_fp32(layer.rosa_B).double().cpu()
        with gathered([layer.base_layer.weight]):
            wf = layer.frozen_weight().detach().double().cpu()
        if layer.has_master or not engine.rosa_config.frozen_master:
            w = w0[name].t() if layer.transposed else w0[name]
            errors[name] = float((wf + a @ b - w).norm() / w.norm())
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--dtype", required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    w0 = {n: m.weight.detach().double().clone() for n, m in find_targets(build("tiny-llama"), ROSA)}
    engine = engine_for(a.stage, a.dtype)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    layers = [l for _, l in iter_rosa_layers(engine.module)]
    out = {"rank": rank, "world": world, "device": str(device()), "stage": a.stage, "dtype": a.dtype,
           "owners": {str(k): v for k, v in sorted(assign_owners(layers, world).items())},
           "split_errors": split_errors(engine, w0)}
    out["losses"] = [train_step(engine, s) for s in range(3)]
    before = logits(engine)
    engine.resample()
    out["resample_logits_rel_change"] = float((logits(engine) - before).norm() / before.norm())
    engine.save_checkpoint(a.workdir / "ckpt", tag="ckpt")
    out["next_loss"] = train_step(engine, 3)
    fresh = engine_for(a.stage, a.dtype)
    fresh.load_checkpoint(a.workdir / "ckpt", tag="ckpt")
    out["resumed_loss"] = train_step(fresh, 3)
    out["resumed_bit_for_bit"] = out["resumed_loss"] == out["next_loss"]
    fresh.settle()
    save_merged(fresh.ds.module, a.workdir / "export", max_shard_bytes=SHARD_BYTES)
    Path(a.result).write_text(json.dumps(out))
    shutdown_distributed()
    exit_now(0)


if __name__ == "__main__":
    main()
