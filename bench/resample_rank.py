"""One rank of the resampling micro-benchmark (launched by ``bench/micro.py``).

Builds the ROSA engine on the default model (ZeRO-2, fp32), then times full resamples of every
adapted layer with owner-rank SVDs (each layer's SVD once in the world, results broadcast) and
with every rank doing every SVD, for each solver of the singular directions (``RosaConfig.solver``).
Writes one JSON record per rank: ``{solver: {mode: timings}}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import rosa_ds
from rosa_ds.factorize import SVD_CALLS
from rosa_ds.recipe.models import load_model_and_tokenizer
from tests.helpers.models import ds_test_config


def time_mode(engine, mode: str, repeats: int) -> dict:
    """Best of ``repeats`` full resamples; the barriers make the slowest rank's time everyone's."""
    times, svd_s, svds, phases = [], [], [], []
    for _ in range(repeats):
        torch.distributed.barrier()
        SVD_CALLS.update(count=0, seconds=0.0)
        start = time.perf_counter()
        event = engine.resample(owner_svd=mode == "owner")
        phases.append({k: event[k] for k in ("gather_s", "svd_s", "exchange_s", "write_s") if k in event})
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
        svd_s.append(SVD_CALLS["seconds"])
        svds.append(SVD_CALLS["count"])
    best = times.index(min(times))
    return {"seconds": times[best], "all_seconds": times, "svd_seconds_here": min(svd_s), "svds_here": svds[0],
            "phases": phases[best]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--modes", default="owner,every")
    p.add_argument("--solvers", default="gram,svd")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--result", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model_and_tokenizer(a.model)
    cfg = ds_test_config(a.stage, micro_batch=1)
    t0 = time.perf_counter()
    engine = rosa_ds.initialize(model, rosa_ds.RosaConfig(rank=a.rank), config=cfg)
    out = {"initial_factorization_s": time.perf_counter() - t0,
           "layers": sum(1 for _ in rosa_ds.iter_rosa_layers(model))}
    for solver in a.solvers.split(","):
        engine.state.rosa_config = dataclasses.replace(engine.rosa_config, solver=solver)  # what resamples read
        out[solver] = {mode: time_mode(engine, mode, a.repeats) for mode in a.modes.split(",")}
    with open(a.result, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
    from rosa_ds.ds.dist import shutdown_distributed
    from rosa_ds.utils.dist import exit_now

    shutdown_distributed()
    exit_now(0)
