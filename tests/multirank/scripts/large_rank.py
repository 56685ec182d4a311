"""One rank of the large-model tests on ZeRO-3; writes JSON.

Loads --model-dir partitioned (rosa_ds.ds.load) while sampling this process's RSS and reports the
peak increase and sha256 digests of the full parameters (``load``); with --out it then applies
ROSA, trains 2 steps, resamples and exports streamed and sharded (--max-shard MB) while sampling
RSS (``export``), rank 0 also saving the in-memory merge. One launch serves both tests: the
export needs the same partitioned load.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from rosa_ds.ds.dist import init_distributed, shutdown_distributed  # noqa: E402
from rosa_ds.ds.params import gathered  # noqa: E402
from rosa_ds.utils.dist import exit_now  # noqa: E402
from tests.helpers.memory import RssSampler  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", default="", help="also train, resample and export the model here")
    ap.add_argument("--max-shard", type=int, default=30)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    init_distributed()
    # code, not the model: imported before measuring
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    from rosa_ds.ds.load import load_partitioned
    from tests.helpers.models import ds_test_config

    cfg = ds_test_config(3)
    config = AutoConfig.from_pretrained(a.model_dir)
    with RssSampler() as rss:
        model = load_partitioned(lambda: AutoModelForCausalLM.from_config(config), Path(a.model_dir), cfg,
                                 torch.float32)
    digests = {}
    for name, p in model.named_parameters():
        with gathered([p]):
            digests[name] = digest(p)
    out = {"rank": torch.distributed.get_rank(), "peak_increase": rss.peak_increase, "digests": digests,
           "local_numel": sum(p.ds_tensor.numel() for p in model.parameters()),
           "tied": model.lm_head.weight is model.model.embed_tokens.weight}
    if a.out:
        out["export_peak_increase"] = export(model, cfg, config.vocab_size, a)
    Path(a.result).write_text(json.dumps(out))
    shutdown_distributed()
    exit_now(0)


def export(model, cfg: dict, vocab: int, a) -> int:
    """Train the loaded model 2 steps with ROSA, resample, export; the export's peak RSS increase."""
    import rosa_ds
    from rosa_ds import RosaConfig
    from rosa_ds.ds.export import save_model
    from tests.helpers.models import lm_batch

    engine = rosa_ds.initialize(model, RosaConfig(rank=4, seed=1), config=cfg)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for step in range(2):
        batch = lm_batch(step, world, 2, rank, vocab=vocab)
        engine.backward(engine(**batch).loss)
        engine.step()
    engine.resample()
    merged = engine.merged_state_dict()  # the whole merge in memory, for comparison only
    if rank == 0:
        torch.save(merged, Path(a.out) / "merged.pt")
    del merged
    with RssSampler() as rss:
        save_model(engine.module, Path(a.out) / "model", max_shard_bytes=a.max_shard << 20)
    return rss.peak_increase


if __name__ == "__main__":
    main()
