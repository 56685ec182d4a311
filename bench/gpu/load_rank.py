"""One rank of the GPU verdict's partitioned-loading check: a model loaded partitioned under ZeRO-3
(``rosa_ds.ds.load.load_partitioned``: built under ``zero.Init`` on the accelerator, each rank
filling its own partitions from the safetensors) must equal the same files loaded by transformers'
``from_pretrained``: every weight bit for bit once gathered, and the logits of a fixed batch.

    launched by the driver: --model tiny-llama --dtype bf16 --result out.json

On a GPU this is where ``zero.Init``'s patched tensor factories and the accelerator's own copy
kernels meet the loader; on the CPU accelerator it is the rehearsal of the same code.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.gpu.models import build
from rosa_ds.ds.dist import device, init_distributed, shutdown_distributed
from rosa_ds.ds.load import load_partitioned
from rosa_ds.ds.params import gathered
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.no_grad()
def compare(name: str, dtype_name: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype, dev = DTYPES[dtype_name], device()
    with tempfile.TemporaryDirectory() as tmp:
        build(name, seed=3, dtype=dtype).save_pretrained(tmp)
        reference = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(dev).eval()
        config = AutoConfig.from_pretrained(tmp)
        model = load_partitioned(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype), Path(tmp),
                                 ds_test_config(3, dtype_name), dtype).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    expected = reference(input_ids=ids).logits.float()
    wanted = dict(reference.named_parameters())
    params = list(model.named_parameters())
    with gathered([p for _, p in params]):
        differ = [n for n, p in params if not torch.equal(p.detach().to(dev), wanted[n].detach())]
        logits = model(input_ids=ids).logits.float()
    gap = (logits - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    return {"dtype": dtype_name, "device": str(dev), "params": len(params), "params_differing": differ[:10],
            "logits_max_relative_difference": gap, "partitioned": all(hasattr(p, "ds_id") for _, p in params)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    ap.add_argument("--result", required=True)
    a = ap.parse_args()
    init_distributed()
    rows = [compare(a.model, d) for d in (a.dtype or ["fp32", "bf16"])]
    Path(a.result).write_text(json.dumps({"rows": rows}))
    shutdown_distributed()
    exit_now(0)


if __name__ == "__main__":
    main()
