"""Sequence classification end to end: `deepspeed --num_gpus 2 launch/train.py --task classification`
on a tiny BERT built from a config, for ROSA / LoRA / full under ZeRO-3 / 1 / 2; the merged export
reloaded with plain transformers must carry the label names and reproduce the trained model's
eval predictions. Plus bad input (one clear line before any weights load), the classification
defaults, and the metrics against hand-computed values."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import CLI_TIMEOUT, ROOT, launch_cli, metrics_records

TIMEOUT = 180  # one launch takes ~30 s on 2 busy cores
LABELS = ["politics", "sport"]  # tiny_records(classes=2): the first two topics, sorted
N_RECORDS = 240  # 24 held out (eval_fraction 0.1), 216 train = 27 steps of 8 per epoch
SEQ_LEN = 16  # texts are 5 words: [CLS] + <= 10 word pieces + [SEP] fit


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers.assets import save_tiny_model_dir, tiny_records, write_tiny_dataset

    d = tmp_path_factory.mktemp("cls_assets")
    save_tiny_model_dir(d / "bert", "bert-cls")  # saved with a 3-way head: the run must replace it
    write_tiny_dataset(d / "data.jsonl", records=tiny_records("classification", N_RECORDS, classes=2))
    return d


def common(assets, method, stage, lr):
    return ["--task", "classification", "--model", str(assets / "bert"), "--dataset", str(assets / "data.jsonl"),
            "--method", method, "--deepspeed", str(ROOT / "ds_configs" / f"zero{stage}.json"),
            "--seq-len", str(SEQ_LEN), "--micro-batch", "4", "--epochs", "4", "--lr", lr, "--rank", "4"]


def reloaded_predictions(model_dir, assets, max_eval):
    """(gold names, predicted names, logits [N, K], mean CE loss) of the exported model on the run's
    eval split, with plain transformers and one unpadded sample per forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rosa_ds.recipe.data import DataConfig, check_data, tokenize_data

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = check_data(DataConfig(task="classification", dataset=str(assets / "data.jsonl"), seq_len=SEQ_LEN,
                                max_eval_samples=max_eval, cache_dir=""))
    data = tokenize_data(raw, tok)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    logits, golds = [], []
    with torch.no_grad():
        for i in range(len(data.eval)):
            sample = data.eval[i]
            logits.append(model(input_ids=sample["input_ids"][None]).logits[0])
            golds.append(sample["labels"])
    logits = torch.stack(logits)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(golds)).item()
    return [names[g] for g in golds], [names[int(k)] for k in logits.argmax(-1)], logits, loss


# 27 optimizer steps per epoch, 4 epochs. Learning rates from sweeps of this task (8 seeds, one
# process): ROSA learns reliably at 1e-2; LoRA (B starts at 0, scale 2) and full FT at 5e-3
# (LoRA at 1e-2 stalls at chance for some seeds). The ZeRO-3 case holds out 23 samples: shards of
# 12 and 11, so the ranks' eval loops must stay in step with a throwaway batch.
@pytest.mark.parametrize("method, stage, lr, max_eval", [
    ("rosa", 3, "1e-2", 23), ("lora", 1, "5e-3", None), ("full", 2, "5e-3", None)])
def test_cls_trains_and_exports_a_plain_classifier(tmp_path, assets, method, stage, lr, max_eval):
    out = tmp_path / "run"
    extra = ["--max-eval-samples", str(max_eval)] if max_eval else []
    launch_cli(common(assets, method, stage, lr) + extra, out)
    recs = metrics_records(out)
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 27, 54, 81, 108]
    assert [r["step"] for r in recs if r.get("event") == "resample"] == ([27, 54, 81] if method == "rosa" else [])
    # It learned: chance is 50% on two balanced classes; the start is the untrained head.
    first, last = evals[0], evals[-1]
    assert last["accuracy"] >= 0.8 and last["mcc"] > 0.5, evals
    assert last["eval_loss"] < 0.5 * first["eval_loss"], evals

    # The export is a plain AutoModelForSequenceClassification with the label names of the data.
    config = json.loads((out / "final_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "politics", "1": "sport"} and config["label2id"] == {"politics": 0, "sport": 1}
    from safetensors import safe_open

    with safe_open(str(out / "final_model" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "classifier.weight" in keys and not [k for k in keys if "rosa_" in k or "lora_" in k or "base_layer" in k]

    # ...that predicts what the trained model predicted at its last eval. Both are fp32; they differ
    # in rounding order only: the trainer ran the unmerged model (ROSA x W_f^T + (x B^T) A^T, PEFT's
    # W0 x + s B A x) on right-padded batches of 4, the export runs merged weights one sample at a
    # time. That is ~1e-6 on logits of magnitude < 10 after 2 layers; 1e-4 leaves 100x headroom,
    # while a wrong merge, a lost head update or a permuted label moves logits by >= 1e-2.
    trained = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    golds, preds, logits, loss = reloaded_predictions(out / "final_model", assets, max_eval)
    assert [t["index"] for t in trained] == list(range(len(golds))) == list(range(max_eval or 24))
    assert [t["label"] for t in trained] == golds
    assert [t["pred"] for t in trained] == preds
    torch.testing.assert_close(logits, torch.tensor([t["logits"] for t in trained]), atol=1e-4, rtol=1e-4)
    assert sum(g == p for g, p in zip(golds, preds)) / len(golds) == last["accuracy"]
    assert math.isclose(loss, last["eval_loss"], rel_tol=1e-4), (loss, last["eval_loss"])


# ---------------------------------------------------------------- bad input, before any weights load

def _bad_records(tmp_path, kind):
    """A classification file that is wrong in one way (`kind`), with the message it must produce."""
    from rosa_ds.recipe.data.prepare import split_indices
    from tests.helpers.assets import tiny_records

    rows = tiny_records("classification", 40, classes=2)
    if kind == "eval_only_label":
        # The record the seeded split holds out first gets a class no training record has.
        _, held_out = split_indices([f"line{i}" for i in range(1, len(rows) + 1)], 0.1, 0)
        rows[held_out[0]]["label"] = "tech"
        line = held_out[0] + 1
        return rows, [], f"data.jsonl:{line}: label 'tech' is in the eval split but not in the training split"
    if kind == "one_class":
        return [{**r, "label": "sport"} for r in rows], [], "only one class ('sport') in the training split"
    flags = {"label": ["--label-field", "category"], "text": ["--text-field", "body"],
             "pair": ["--text-pair-field", "hypothesis"]}[kind]
    flag, name = flags
    return rows, flags, f"record has no field '{name}' (fields: label, text); set {flag}"


@pytest.mark.parametrize("kind", ["eval_only_label", "one_class", "label", "text", "pair"])
def test_bad_input_is_one_clear_line_before_weights_load(tmp_path, assets, kind, monkeypatch, capsys):
    """In process (fast): ``load_model_and_tokenizer`` is replaced by a tripwire, so an error raised
    after the weights would have loaded fails the test instead of passing it."""
    from rosa_ds.recipe import build, cli
    from tests.helpers.assets import write_tiny_dataset

    def tripwire(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(build, "load_model_and_tokenizer", tripwire)
    monkeypatch.setenv("ROSA_DS_CACHE", str(tmp_path / "cache"))
    rows, flags, message = _bad_records(tmp_path, kind)
    data = write_tiny_dataset(tmp_path / "data.jsonl", records=rows)
    argv = ["--task", "classification", "--model", str(assets / "bert"), "--dataset", str(data),
            "--output-dir", str(tmp_path / "out"), "--seq-len", str(SEQ_LEN), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rosa_ds: error: "), err
    assert message in err[0], err[0]
    assert not any(p.name != ".rosa_ds.lock" for p in (tmp_path / "out").glob("*")) and \
        not (tmp_path / "out" / ".rosa_ds.lock").exists()  # only the writability check ran; the lock released


def test_bad_input_from_the_real_entry_point(tmp_path, assets):
    """The same through `python launch/train.py` (one process): exit 2, one line, no traceback."""
    from tests.helpers.assets import tiny_records, write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "d.jsonl", records=tiny_records("classification", 20, classes=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROSA_DS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--task", "classification",
                           "--model", str(assets / "bert"), "--dataset", str(data), "--label-field", "topic",
                           "--output-dir", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "rosa_ds: error:" in line]
    assert errors == [f"rosa_ds: error: {data}:1: record has no field 'topic' (fields: label, text); "
                      "set --label-field"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- defaults and metrics

def test_classification_defaults():
    from rosa_ds.recipe.config import parse_args

    cfg = parse_args(["--task", "classification"])
    assert (cfg.model, cfg.data.dataset, cfg.lr, cfg.data.max_eval_samples, cfg.data.max_train_samples,
            cfg.epochs) == ("default", "bbc-topics", 2e-3, 200, 256, 2)
    assert parse_args(["--task", "classification", "--method", "full"]).lr == 1e-4
    # A value the user gives wins, even when it equals the generic default.
    assert parse_args(["--task", "classification", "--max-eval-samples", "32"]).data.max_eval_samples == 32
    assert parse_args(["--task", "classification", "--lr", "5e-4"]).lr == 5e-4
    assert parse_args([]).data.max_eval_samples == 32 and parse_args([]).lr == 5e-4  # the LM job is unchanged


def test_classification_metrics_hand_computed():
    from rosa_ds.recipe.metrics import classification_metrics

    # Confusion (rows gold, cols pred): [[1,1,0],[0,2,0],[1,0,1]]. Per class P/R/F1: 1/2,1/2,1/2;
    # 2/3,1,4/5; 1,1/2,2/3. MCC: c=4, s=6, p=(2,3,1), t=(2,2,2): (24-12)/sqrt((36-14)(36-12)).
    m = classification_metrics([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2], 3)
    assert math.isclose(m["accuracy"], 4 / 6)
    assert math.isclose(m["macro_f1"], (1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert math.isclose(m["mcc"], 12 / math.sqrt(22 * 24))
    # Two classes: the multi-class MCC is the classic (TP TN - FP FN) / sqrt(...) formula.
    preds, golds = [1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1, 0]
    tp, tn, fp, fn = 3, 2, 2, 1
    classic = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert math.isclose(classification_metrics(preds, golds, 2)["mcc"], classic)
    # A constant predictor has MCC 0 (denominator 0), not NaN; an absent class scores F1 0.
    assert classification_metrics([0, 0], [0, 1], 3) == pytest.approx({"accuracy": 0.5, "macro_f1": 2 / 9, "mcc": 0.0})


def test_write_predictions_orders_by_index_and_names_labels(tmp_path):
    from rosa_ds.recipe.metrics import eval_postfix, write_predictions

    path = tmp_path / "p.jsonl"
    write_predictions(path, [(1, [0.5, -1.0]), (0, [-0.25, 2.0])], [1, 0], ["neg", "pos"])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"index": 0, "label": "pos", "pred": "pos", "logits": [-0.25, 2.0]},
        {"index": 1, "label": "neg", "pred": "neg", "logits": [0.5, -1.0]}]
    assert eval_postfix(None) == {} and eval_postfix({"eval_loss": 1.0}) == {}
    assert eval_postfix({"accuracy": 0.5, "macro_f1": 0.25}) == {"eval_acc": "0.500", "eval_f1": "0.250"}
