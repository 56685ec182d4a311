"""End-to-end CLI runs with the real DeepSpeed launcher on 2 CPU ranks, a tiny model and data."""
import json
import math
import shutil

import pytest
import torch

from tests.helpers.launch import ROOT, launch_cli, metrics_records


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers.assets import save_tiny_model_dir, write_tiny_dataset

    d = tmp_path_factory.mktemp("assets")
    save_tiny_model_dir(d / "llama", "llama")
    write_tiny_dataset(d / "data.jsonl", "prompt_target", n=64)
    return d


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
@pytest.mark.parametrize("method, stage, extra, spe", [
    ("rosa", 1, [], 7), ("rosa", 2, ["--grad-accum", "2"], 3),
    ("rosa", 3, ["--micro-batch", "2", "--max-eval-samples", "5"], 14), ("lora", 3, [], 7), ("full", 2, [], 7)])
def test_cli_trains_and_exports_a_plain_model(tmp_path, assets, method, stage, extra, spe):
    out = tmp_path / "run"
    launch_cli(common(assets, method, stage) + extra, out)
    recs = metrics_records(out)
    evals = [r for r in recs if r.get("event") == "eval"]
    resamples = [r for r in recs if r.get("event") == "resample"]
    assert [e["step"] for e in evals] == [0, spe, 2 * spe]
    assert [r["step"] for r in resamples] == ([spe] if method == "rosa" else [])
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 2 * spe + 1))  # one record per optimizer step
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals  # it learned
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == method
    # the export is a plain model whose eval loss equals the trained (unmerged) model's
    loss = reloaded_eval_loss(out / "final_model", assets, 5 if "--max-eval-samples" in extra else 16)
    assert math.isclose(loss, evals[-1]["eval_loss"], rel_tol=1e-4), (loss, evals[-1]["eval_loss"])
    from safetensors import safe_open

    with safe_open(str(out / "final_model" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "rosa_" in k or "lora_" in k or "base_layer" in k]


def test_resume_from_output_dir_continues_exactly(tmp_path, assets):
    full = tmp_path / "full"
    args = common(assets, "rosa", 2) + ["--save-every", "9"]
    launch_cli(args, full)
    steps = {r["step"]: r["loss"] for r in metrics_records(full) if "loss" in r}
    # a run stopped after step 9 (past the resample at the epoch boundary after step 7): its output dir
    stopped = tmp_path / "stopped"
    shutil.copytree(full, stopped, ignore=shutil.ignore_patterns("final_model", "metrics.jsonl"))
    (stopped / "checkpoints" / "latest").write_text("step_00000009")
    launch_cli(args + ["--resume"], stopped)
    resumed = {r["step"]: r["loss"] for r in metrics_records(stopped) if "loss" in r}
    assert min(resumed) == 10 and resumed == {s: l for s, l in steps.items() if s >= 10}


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["--dataset", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--target-field", "answer"], "record has no field 'answer'"),
    (["--seq-len", "4096"], "--seq-len 4096 is longer than the model's context"),
    (["--deepspeed", "{JSON}", "--lr", "1e-3"], "train_micro_batch_size_per_gpu"),
    (["--deepspeed", "{JSON_BATCH}"], "train_batch_size"),
])
def test_bad_input_is_one_clear_line_before_heavy_work(tmp_path, assets, extra, message):
    template = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    contradicting = {**template, "train_micro_batch_size_per_gpu": 2, "optimizer": {
        **template["optimizer"], "params": {**template["optimizer"]["params"], "lr": 5e-4}}}
    (tmp_path / "contradicting.json").write_text(json.dumps(contradicting))
    (tmp_path / "batch.json").write_text(json.dumps({**template, "train_batch_size": 10}))
    extra = [{"{JSON}": str(tmp_path / "contradicting.json"), "{JSON_BATCH}": str(tmp_path / "batch.json")}.get(x, x)
             for x in extra]
    proc = launch_cli(common(assets, "rosa", 2) + extra, tmp_path / "bad", world=1, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "rosa_ds: error:" in text, text[-2000:]
    error = text[text.index("rosa_ds: error:"):].split("\n[")[0]  # the error block, up to the launcher's log
    assert message in error, error
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
