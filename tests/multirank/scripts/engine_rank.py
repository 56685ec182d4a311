"""One rank of a ROSA engine run on a tiny GPT-2; writes what the tests compare as JSON."""
import argparse
import hashlib
import json

import torch

import rosa_ds
from rosa_ds import RosaConfig
from rosa_ds.ds.dist import shutdown_distributed
from rosa_ds.ds.optim import factor_state
from rosa_ds.ds.params import full_fp32, full_fp32_many, gathered
from rosa_ds.factorize import SVD_CALLS
from rosa_ds.inject import iter_rosa_layers
from rosa_ds.schedule import ScheduleConfig
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config, lm_batch, no_dropout_gpt2

p = argparse.ArgumentParser()
p.add_argument("--stage", type=int, default=2)
p.add_argument("--dtype", default="fp32")
p.add_argument("--rank", type=int, default=3)
p.add_argument("--steps-per-epoch", type=int, default=3)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--micro-batch", type=int, default=2)
p.add_argument("--save-at", type=int, default=0, help="save a checkpoint after this many steps")
p.add_argument("--stop-at", type=int, default=0, help="exit after this many steps (simulated stop)")
p.add_argument("--resume", default="")
p.add_argument("--ckpt", default="")
p.add_argument("--merged-out", default="")
p.add_argument("--offload", action="store_true")
p.add_argument("--client-adamw", action="store_true", help="torch AdamW as a client optimizer factory")
p.add_argument("--sgd", action="store_true", help="plain SGD without momentum (--optim sgd's config)")
p.add_argument("--grad-accum-fp32", action="store_true",
               help="data_types.grad_accum_dtype fp32 (ZeRO-1 + bf16: DeepSpeed's BF16_Optimizer)")
p.add_argument("--frozen-master", choices=["auto", "on", "off"], default="auto")
p.add_argument("--node-local-ckpt", action="store_true", help="each rank saves under its own directory")
p.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
p.add_argument("--grads-at", type=int, nargs="*", default=[], help="record every factor's full gradient at these steps")
p.add_argument("--result", required=True)
a = p.parse_args()

torch.manual_seed(1234)
model = no_dropout_gpt2()
if a.checkpointing:
    from rosa_ds.recipe.models import enable_activation_checkpointing

    enable_activation_checkpointing(model)
cfg = ds_test_config(a.stage, a.dtype, a.micro_batch, offload=a.offload)
if a.grad_accum_fp32:
    cfg["data_types"] = {"grad_accum_dtype": "fp32"}
optimizer = None
if a.sgd:
    from rosa_ds.ds.config import plain_sgd

    plain_sgd(cfg)
if a.client_adamw:
    kw = cfg.pop("optimizer")["params"]
    kw.pop("torch_adam", None)
    cfg["zero_allow_untested_optimizer"] = True
    optimizer = lambda params: torch.optim.AdamW(params, **kw)  # noqa: E731
frozen_master = {"auto": None, "on": True, "off": False}[a.frozen_master]
engine = rosa_ds.initialize(model, RosaConfig(rank=a.rank, seed=7, frozen_master=frozen_master), config=cfg,
                            optimizer=optimizer, schedule=ScheduleConfig("epoch"))
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
if a.node_local_ckpt:  # a node-local disk per rank: rank 0's published checkpoint is not visible to rank 1
    a.ckpt = f"{a.ckpt}/rank{rank}"


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def frozen_master_ok(layer, owner: int) -> bool:
    """The owner alone holds an fp32 master of W_f, and the module's W_f is it rounded once (call
    inside ``gathered``); with masters off nobody holds one."""
    if not engine.rosa_config.frozen_master:
        return not layer.has_master
    if owner != rank:
        return not layer.has_master
    w = layer.base_layer.weight
    master = layer.base_master.t() if layer.transposed else layer.base_master
    return layer.has_master and torch.equal(w, master.to(w.dtype))


def after_resample_checks() -> dict:
    """Checksums of full W_f, A, B (module and fp32 master) and the factors' optimizer state."""
    from rosa_ds.owners import assign_owners

    sums, module_eq_master, masters_ok = [], True, True
    owners = assign_owners([l for _, l in iter_rosa_layers(engine.module)], world)
    for _, layer in iter_rosa_layers(engine.module):
        a32, b32 = full_fp32(layer.rosa_A), full_fp32(layer.rosa_B)
        with gathered([layer.base_layer.weight, layer.rosa_A, layer.rosa_B]):
            sums.append([digest(layer.base_layer.weight), digest(layer.rosa_A), digest(layer.rosa_B), digest(a32)])
            masters_ok &= frozen_master_ok(layer, owners[layer.layer_index])
            if a.dtype == "fp32":
                module_eq_master &= bool(torch.equal(layer.rosa_A.float(), a32)
                                         and torch.equal(layer.rosa_B.float(), b32))
            else:  # the module holds the master rounded once to bf16
                module_eq_master &= bool(torch.equal(layer.rosa_A, a32.to(layer.rosa_A.dtype)))
    states = factor_state(engine.optimizer, engine.factor_params)
    # the resample's one-collective gather of every factor's fp32 master = one DeepSpeed call per factor
    params = [p for _, layer in iter_rosa_layers(engine.module) for p in (layer.rosa_A, layer.rosa_B)]
    batched_exact = all(torch.equal(x, full_fp32(p)) for x, p in zip(full_fp32_many(params), params))
    return {"checksums": sums, "module_eq_master": module_eq_master, "batched_gather_exact": batched_exact,
            "state_empty": all(len(s) == 0 for s in states), "n_state_groups": len(states),
            "frozen_masters_ok": masters_ok,
            "frozen_masters_here": sum(l.has_master for _, l in iter_rosa_layers(engine.module))}


start_step = 0
if a.resume:
    client = engine.load_checkpoint(a.resume)
    start_step = client["step"]
total = a.steps_per_epoch * a.epochs
losses, resamples, svd_before, grads, grad_norms = {}, [], SVD_CALLS["count"], {}, {}
for step in range(start_step, total):
    engine.train()
    batch = lm_batch(step, world, a.micro_batch, rank)
    loss = engine(**batch).loss
    engine.backward(loss)
    if step in a.grads_at:  # after backward, before the step: the reduced full gradient of each factor
        from deepspeed.utils import safe_get_full_grad

        grads[step] = [safe_get_full_grad(p).float().flatten().tolist() for p in engine.factor_params]
    engine.step()
    losses[step] = float(loss.detach().float())
    grad_norms[step] = engine.grad_norm()
    done = step + 1
    if done % a.steps_per_epoch == 0:
        epoch = done // a.steps_per_epoch - 1
        svd0 = SVD_CALLS["count"]
        event = engine.end_epoch(epoch, a.epochs)
        if event:
            checks = after_resample_checks()
            checks["svds_here"] = SVD_CALLS["count"] - svd0
            checks["step"] = done
            resamples.append(checks)
    if resamples and done == resamples[-1]["step"] + 1:
        states = factor_state(engine.optimizer, engine.factor_params)
        resamples[-1]["step_after_next_update"] = [int(torch.as_tensor(s["step"]).item())
                                                   for s in states if "step" in s]
    if a.save_at and done == a.save_at:
        engine.save_checkpoint(a.ckpt, client_state={"step": done})
    if a.stop_at and done == a.stop_at:
        break

merged = engine.merged_state_dict()
if rank == 0 and a.merged_out:
    torch.save(merged, a.merged_out)
result = {"rank": rank, "world": world, "losses": losses, "resamples": resamples, "grads": grads,
          "grad_norms": grad_norms,
          "svds_total_here": SVD_CALLS["count"] - svd_before, "n_layers": len(list(iter_rosa_layers(engine.module))),
          "trainable_state_groups": len(engine.optimizer.optimizer.param_groups)}
with open(a.result, "w") as f:
    json.dump(result, f)
shutdown_distributed()
exit_now(0)
