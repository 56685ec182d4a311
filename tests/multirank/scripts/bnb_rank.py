"""One rank of a ROSA engine run with bitsandbytes pieces: 8-bit AdamW (``--optim adamw8bit``)
and/or a quantized frozen base (``--quantize-base nf4|int8``), on a tiny GPT-2 at R = 16, whose
factor partition per rank (8192 elements) is large enough for bitsandbytes to keep 8-bit state
(it keeps 32-bit state below 4096). Writes per-step losses, what each resample left in the
optimizer, and the merged model."""
import argparse
import json

import torch


def pattern_batch(step: int, world: int, micro: int, rank: int | None = None, seq_len: int = 16,
                  vocab: int = 128) -> dict:
    """Global batch of step ``step`` (or ``rank``'s slice): arithmetic token sequences, a rule the
    model can learn in a few steps, so optimizer differences show up in the loss."""
    g = torch.Generator().manual_seed(20_000 + step)
    n = world * micro
    start, stride = torch.randint(0, vocab, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq_len)) % vocab
    if rank is not None:
        ids = ids[rank * micro:(rank + 1) * micro]
    return {"input_ids": ids, "labels": ids.clone()}


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--optim", default="adamw", choices=("adamw", "adamw8bit"))
    p.add_argument("--quantize-base", default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16 (bench/gpu/check.py runs bf16 on the GPU)")
    p.add_argument("--steps-per-epoch", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--no-reset", action="store_true", help="failure mode: keep the factors' state at resample")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", default="")
    p.add_argument("--ckpt", default="")
    p.add_argument("--merged-out", default="")
    p.add_argument("--result", required=True)
    return p.parse_args()


def main() -> None:
    import rosa_ds
    from rosa_ds import RosaConfig
    from rosa_ds.ds import resample as ds_resample
    from rosa_ds.ds.dist import device
    from rosa_ds.ds.optim import factor_state, flat_groups
    from rosa_ds.ds.params import full_fp32
    from rosa_ds.inject import iter_rosa_layers
    from rosa_ds.schedule import ScheduleConfig
    from tests.helpers.models import ds_test_config, no_dropout_gpt2

    a = parse()
    if a.no_reset:  # make the engine's state reset a no-op (the failure this test must detect)
        ds_resample.reset_factor_state = lambda optimizer, params: 0
    torch.manual_seed(1234)
    cfg = ds_test_config(a.stage, a.dtype, 2, lr=a.lr)
    kw = cfg.pop("optimizer")["params"]
    kw.pop("torch_adam", None)
    cfg["zero_allow_untested_optimizer"] = True
    if a.optim == "adamw8bit":
        import bitsandbytes as bnb

        factory = lambda params: bnb.optim.AdamW8bit(params, **kw)  # noqa: E731  (as trainer._bnb_factory)
    else:
        factory = lambda params: torch.optim.AdamW(params, **kw)  # noqa: E731
    engine = rosa_ds.initialize(no_dropout_gpt2(), RosaConfig(rank=a.rank, seed=7, quantize_base=a.quantize_base),
                                config=cfg, optimizer=factory, schedule=ScheduleConfig("epoch"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def state_summary() -> dict:
        states = factor_state(engine.optimizer, engine.factor_params)
        dtypes = sorted({str(v.dtype) for s in states for v in s.values() if torch.is_tensor(v) and v.numel() > 1})
        steps = [int(torch.as_tensor(s["step"]).item()) for s in states if "step" in s]
        return {"empty": all(len(s) == 0 for s in states), "groups": len(states), "dtypes": dtypes, "steps": steps,
                "partition_numel": [int(f.numel()) for _, f, _ in flat_groups(engine.optimizer)]}

    def snapshot() -> list:
        """Per layer (master, full fp32 A, full fp32 B) before a resample (collective)."""
        return [(l.base_master.clone(), full_fp32(l.rosa_A), full_fp32(l.rosa_B))
                for _, l in iter_rosa_layers(engine.module)] if a.quantize_base else []

    def check_resample(before: list, index: int) -> dict:
        """The distributed resample vs the pure method on the same state: master' = (master + A B)
        - A'B' with (A', B') = new_factors(master + A B), to fp32 rounding (the fp64 accumulation
        order is the seam's business); the buffers are exactly quantize(master') of this rank's own
        master; and (digest) every rank holds the same master and buffers, bit for bit."""
        from rosa_ds.factorize import new_factors
        from rosa_ds.quant import quantize

        worst, exact, digests = 0.0, True, []
        for (master, a32, b32), (_, layer) in zip(before, iter_rosa_layers(engine.module)):
            w = master.double() + a32.double().cpu() @ b32.double().cpu()
            f = new_factors(w.float(), engine.rosa_config, index, layer.layer_index)
            want = w - f.a.double() @ f.b.double()
            worst = max(worst, float((layer.base_master.double() - want).norm() / want.norm()))
            q, scale = quantize(layer.base_master, a.quantize_base)
            exact &= torch.equal(layer.base_layer.qdata.flatten(), q.flatten())
            exact &= torch.equal(layer.base_layer.qscale, scale)
            digests.append(float(layer.base_master.double().sum()) + float(layer.base_layer.qdata.double().sum()))
        return {"master_rel_err": worst, "buffers_exact": bool(exact), "digest": digests}

    start = engine.load_checkpoint(a.resume)["step"] if a.resume else 0
    losses, resamples, states = {}, [], {}
    for step in range(start, a.steps_per_epoch * a.epochs):
        engine.train()
        loss = engine(**{k: v.to(device()) for k, v in pattern_batch(step, world, 2, rank).items()}).loss
        engine.backward(loss)
        engine.step()
        losses[step] = float(loss.detach())
        done = step + 1
        states[done] = state_summary()
        before = snapshot() if done % a.steps_per_epoch == 0 else []
        event = done % a.steps_per_epoch == 0 and engine.end_epoch(done // a.steps_per_epoch - 1, a.epochs)
        if event:
            checks = check_resample(before, event["index"]) if a.quantize_base else {}
            resamples.append({"step": done, **state_summary(), **checks})
        if a.save_at and done == a.save_at:
            engine.save_checkpoint(a.ckpt, client_state={"step": done})
    on_host = [l.base_master is not None and l.base_master.device.type == "cpu"
               for _, l in iter_rosa_layers(engine.module)]
    merged = engine.merged_state_dict()
    if rank == 0 and a.merged_out:
        torch.save(merged, a.merged_out)
    with open(a.result, "w") as f:
        json.dump({"rank": rank, "losses": losses, "resamples": resamples, "states": states,
                   "masters_on_host": all(on_host)}, f)


if __name__ == "__main__":
    main()
    from rosa_ds.ds.dist import shutdown_distributed
    from rosa_ds.utils.dist import exit_now

    shutdown_distributed()
    exit_now(0)
