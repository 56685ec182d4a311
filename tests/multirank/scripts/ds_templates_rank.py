"""One rank of the template smoke test: every ds_configs/*.json, filled by build_ds_config, must
initialize DeepSpeed and train a tiny GPT-2 exactly like plain PyTorch AdamW on the global batch.

For each template: fill it (micro 2, accum 1, lr 1e-2, wd 0.01, 6 total steps, 2 warmup steps), run 5
optimizer steps on this rank's slice of a fixed global batch, gather the full parameters and
compare with a reference trained by torch.optim.AdamW on the whole global batch with the
hand-computed WarmupDecayLR learning rates and gradient clipping at 1.0.
"""
import argparse
import copy
import json
import time

import torch

from rosa_ds.ds.config import RunValues, batch_sizes, build_ds_config, offload_optimizer, zero_stage
from tests.helpers.models import tiny_model

MICRO, LR, WD, TOTAL, WARMUP, STEPS, SEQ = 2, 1e-2, 0.01, 6, 2, 5, 16


def expected_lr(k: int) -> float:
    """LR of optimizer step k under DeepSpeed's WarmupDecayLR (linear), as DeepSpeed applies it:
    the optimizer starts at warmup_min_lr (0) and the scheduler steps after each optimizer step,
    so step k uses f(k-1), with f(i) = LR·i/W while i < W, then LR·(T-i)/(T-W); W = max(2, W)."""
    if k == 0:
        return 0.0
    i, w = k - 1, max(2, WARMUP)
    return LR * i / w if i < w else LR * max(0.0, (TOTAL - i) / max(1, TOTAL - w))


def global_batch(step: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 128, (world * MICRO, SEQ), generator=g)


def reference(model, world: int) -> torch.Tensor:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    for k in range(STEPS):
        ids = global_batch(k, world)
        # Mean of per-rank mean losses over equal-length slices = the global mean loss.
        loss = torch.stack([model(input_ids=c, labels=c).loss for c in ids.split(MICRO)]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = expected_lr(k)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_template(name: str, rank: int, world: int) -> dict:
    import deepspeed

    model = tiny_model("gpt2", seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    init = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    ref = reference(copy.deepcopy(model), world)
    run = RunValues(micro_batch=MICRO, grad_accum=1, lr=LR, total_steps=TOTAL, warmup_steps=WARMUP, weight_decay=WD)
    cfg = build_ds_config(name, run, world)
    t0 = time.time()
    engine, optimizer, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    init_s = time.time() - t0
    lrs = []
    for k in range(STEPS):
        ids = global_batch(k, world)[rank * MICRO:(rank + 1) * MICRO]
        lrs.append(engine.get_lr()[0])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        got = torch.cat([p.detach().reshape(-1).clone() for p in params])
    basic = getattr(optimizer, "optimizer", optimizer)
    return {"stage": zero_stage(cfg), "offload": offload_optimizer(cfg), "batch": list(batch_sizes(cfg)),
            "optimizer": type(basic).__name__, "lrs": lrs, "expected_lrs": [expected_lr(k) for k in range(STEPS)],
            "rel_err": float((got - ref).norm() / ref.norm()), "moved": float((ref - init).abs().max()),
            "init_s": round(init_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", nargs="+", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    from rosa_ds.ds.dist import init_distributed

    init_distributed()  # gloo on CPU, without JIT-building the shm op
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.set_num_threads(1)
    out = {name: run_template(name, rank, world) for name in args.templates}
    with open(args.result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
    from rosa_ds.ds.dist import shutdown_distributed
    from rosa_ds.utils.dist import exit_now

    shutdown_distributed()
    exit_now(0)
