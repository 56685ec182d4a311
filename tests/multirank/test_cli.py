"""End-to-end CLI runs on 2 CPU ranks, a tiny model and data. The ZeRO-2 ROSA case is the README's
command, ``deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json``, through the real
runner; the others start their ranks directly (``launch_cli``: the runner's start-up tests nothing
they check)."""
import json
import math

import pytest
import torch

from tests.helpers.launch import ROOT, launch_cli, metrics_records


@pytest.fixture(scope="module")
def assets(cli_assets):
    return cli_assets


def common(assets, method, stage):
    return ["--model", str(assets / "llama"), "--dataset", str(assets / "data.jsonl"), "--method", method,
            "--deepspeed", str(ROOT / "ds_configs" / f"zero{stage}.json"), "--seq-len", "48", "--micro-batch", "4",
            "--epochs", "2", "--lr", "3e-3", "--rank", "4", "--max-eval-samples", "16", "--num-samples", "1"]


def reloaded_eval_loss(model_dir, assets, max_eval=16):
    """Token-mean loss of the exported plain model on the run's eval split, with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rosa_ds.recipe.data import DataConfig, PadCollator, check_data, tokenize_data

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = check_data(DataConfig(dataset=str(assets / "data.jsonl"), seq_len=48, max_eval_samples=max_eval,
                                cache_dir=""))
    data = tokenize_data(raw, tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data.eval)):
            batch = PadCollator(tok.pad_token_id)([data.eval[i]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / count


# 58 training samples: global batch 8 -> 7 steps per epoch. The ZeRO-3 ROSA case evaluates 5 samples
# with micro batch 2 (shards of 3 and 2: ranks must still run the same number of eval forwards).
# The ZeRO-1 case resamples every 7 steps of 14: after step 7, and not after the final step 14.
@pytest.mark.parametrize("method, stage, extra, spe, runner", [
    ("rosa", 1, ["--resample-every", "7"], 7, "direct"), ("rosa", 2, ["--grad-accum", "2"], 3, "deepspeed"),
    ("rosa", 3, ["--micro-batch", "2", "--max-eval-samples", "5"], 14, "direct"), ("lora", 3, [], 7, "direct"),
    ("full", 2, [], 7, "direct")])
def test_cli_trains_and_exports_a_plain_model(tmp_path, assets, method, stage, extra, spe, runner):
    out = tmp_path / "run"
    launch_cli(common(assets, method, stage) + extra, out, runner=runner)
    recs = metrics_records(out)
    evals = [r for r in recs if r.get("event") == "eval"]
    resamples = [r for r in recs if r.get("event") == "resample"]
    assert [e["step"] for e in evals] == [0, spe, 2 * spe]
    assert [r["step"] for r in resamples] == ([spe] if method == "rosa" else [])
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 2 * spe + 1))  # one record per optimizer step
    # the template clips at 1.0: each step records its gradient norm before clipping and whether it was clipped
    assert all(r["grad_norm"] > 0 and r["clipped"] == (r["grad_norm"] > 1.0) for r in steps), steps
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals  # it learned
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == method
    # the export is a plain model whose eval loss equals the trained (unmerged) model's
    loss = reloaded_eval_loss(out / "final_model", assets, 5 if "--max-eval-samples" in extra else 16)
    assert math.isclose(loss, evals[-1]["eval_loss"], rel_tol=1e-4), (loss, evals[-1]["eval_loss"])
    from safetensors import safe_open

    with safe_open(str(out / "final_model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "rosa_" in k or "lora_" in k or "base_layer" in k]
