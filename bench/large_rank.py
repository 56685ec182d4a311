"""One rank of ``bench/large_model.py``: the phases of a ZeRO-3 ROSA run on a large model, each with
this process's peak resident memory (sampled) and the accountant's prediction for it.

Phases: load (partitioned, ``rosa_ds.ds.load``), initialize (ROSA applied partitioned, the first
factorization), 2 optimizer steps, a resample, a checkpoint, a resume (the checkpoint loaded back
into the engine: the next step's loss must equal the uninterrupted one bit for bit), and the
streamed, sharded export.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rosa_ds.ds.dist import init_distributed, shutdown_distributed
from rosa_ds.utils.dist import exit_now
from tests.helpers.memory import RssSampler, rss_bytes

SEQ, MICRO = 32, 1


def ds_config(world: int) -> dict:
    """What users get: ds_configs/zero3.json filled for this run (fp32 on the CPU)."""
    from rosa_ds.ds.config import RunValues, build_ds_config

    return build_ds_config("zero3", RunValues(micro_batch=MICRO, grad_accum=1, lr=1e-4, total_steps=4,
                                              precision="fp32"), world)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--solver", default=None, help="RosaConfig.solver (default: RosaConfig's)")
    a = ap.parse_args()
    init_distributed()
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    import rosa_ds
    from rosa_ds import RosaConfig
    from rosa_ds.ds.census import counts_from_engine
    from rosa_ds.ds.export import save_model
    from rosa_ds.ds.load import load_partitioned
    from rosa_ds.memory import MemoryPlan
    from rosa_ds.memory.phases import phase_peaks

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out, phases = Path(a.out), {}
    baseline = rss_bytes()

    def phase(name, fn):
        torch.distributed.barrier()
        start = time.perf_counter()
        with RssSampler(interval=0.01) as rss:
            value = fn()
        phases[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss": rss.peak,
                        "peak_increase": rss.peak_increase}
        print(f"rank {rank}: {name} {phases[name]}", flush=True)
        return value

    solver = {"solver": a.solver} if a.solver else {}
    config = AutoConfig.from_pretrained(a.model_dir)
    cfg = ds_config(world)
    model = phase("load", lambda: load_partitioned(lambda: AutoModelForCausalLM.from_config(config),
                                                   Path(a.model_dir), cfg, torch.float32))
    engine = phase("initialize", lambda: rosa_ds.initialize(model, RosaConfig(rank=8, seed=0, **solver), config=cfg))
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, config.vocab_size, (MICRO, SEQ), generator=g) for _ in range(4)]

    def step(i):
        engine.train()
        loss = engine(input_ids=batches[i], labels=batches[i]).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    losses = phase("step", lambda: [step(0), step(1)])
    phase("resample", engine.resample)
    phase("checkpoint", lambda: engine.save_checkpoint(out / "ckpt", tag="large"))
    expected = step(2)
    phase("resume", lambda: engine.load_checkpoint(out / "ckpt", tag="large"))
    resumed = step(2)
    engine.eval()
    with torch.no_grad():
        probe = engine(input_ids=batches[3]).logits[0, -1, :16].float().tolist()
    engine.settle()
    phase("export", lambda: save_model(engine.module, out / "export", max_shard_bytes=1 << 30))
    plan = MemoryPlan.from_ds_config(cfg, method="rosa", rank=8, world_size=world, dp_rank=rank, micro_batch=MICRO,
                                     seq_len=SEQ, accelerator="cpu")
    predicted = {p: v.total() for p, v in phase_peaks(counts_from_engine(engine.ds), plan).items()}
    result = {"rank": rank, "baseline_rss": baseline, "phases": phases, "predicted": predicted,
              "losses": losses, "resumed_equal": resumed == expected, "probe_logits": probe,
              "model_bytes": sum(int(p.ds_numel) * 4 for p in engine.module.parameters())}
    Path(a.result).write_text(json.dumps(result))
    shutdown_distributed()
    exit_now(0)


if __name__ == "__main__":
    main()
