"""RosaTrainer (``rosa_ds.hf``) on 2 CPU ranks started by the ``deepspeed`` launcher, tiny Llama.

One launch runs ZeRO-2 (3 epochs, a resample at each epoch end but the last, eval each epoch,
TensorBoard) and ZeRO-3 (gradient accumulation 2, a resample every 2 optimizer steps, checkpoints,
then a resume in a fresh Trainer and model); each checks, after both resamples: the sha256 of W_f,
A, B and the fp32 masters agree across ranks, the factors' optimizer state is empty and the
head's is not; per-step losses equal the rosa_ds engine's on the same model, data order, seed and
schedule; the merged export reloads with plain ``from_pretrained`` and gives the trained model's
eval loss.
"""
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import launch_deepspeed
from tests.helpers.models import tiny_model

SCRIPT = Path(__file__).parent / "scripts" / "hf_trainer_rank.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a model directory (token ids only: no tokenizer needed)."""
    path = tmp_path_factory.mktemp("hf_model")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, model_dir):
    """Both cases in one launch (the process start is most of each case's time on CPU)."""
    tmp = tmp_path_factory.mktemp("hf_runs")
    res = tmp / "results"
    launch_deepspeed(SCRIPT, ["--model-dir", str(model_dir), "--out", str(tmp / "out"), "--result-dir", str(res)],
                     tmp / "cache", timeout=400)
    return tmp, [json.loads((res / f"rank{r}.json").read_text()) for r in (0, 1)]


def check_run(ranks: list[dict], case: str, resample_steps: list[int]) -> None:
    runs = [r[case]["run"] for r in ranks]
    assert all(r["order_ok"] for r in runs), "the Trainer fed other batches than the reference's order"
    assert [e["step"] for e in runs[0]["events"]] == resample_steps
    assert [s["step"] for s in runs[0]["resamples"]] == resample_steps
    for i in range(len(resample_steps)):
        assert runs[0]["resamples"][i]["sums"] == runs[1]["resamples"][i]["sums"], f"ranks differ after resample {i}"
        for r in runs:
            assert r["resamples"][i]["factor_state_sizes"] and not any(r["resamples"][i]["factor_state_sizes"])
            assert r["resamples"][i]["head_state_sizes"] and all(r["resamples"][i]["head_state_sizes"])
    first, second = runs[0]["resamples"][0]["sums"], runs[0]["resamples"][1]["sums"]
    assert first[0][0] != second[0][0] and first[0][1] != second[0][1], "a resample left W_f or A unchanged"
    hf = [runs[0]["losses"][k] for k in sorted(runs[0]["losses"], key=int)]
    ref = ranks[0][case]["reference_losses"]
    assert len(hf) == len(ref) and len(hf) > max(resample_steps)
    worst = max(abs(h - e) / abs(e) for h, e in zip(hf, ref))
    assert worst <= 1e-5, f"Trainer vs engine losses differ by {worst:.2e} relative\n{hf}\n{ref}"


def check_export(out: Path, ranks: list[dict], case: str) -> None:
    """Plain transformers loads the merged model; its loss on the eval set is the trained model's."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(out / case / "merged")
    assert not any("rosa" in n for n, _ in model.named_parameters())
    ids = torch.tensor(ranks[0]["eval_ids"])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    trained = ranks[0][case]["run"]["eval_loss"]
    assert abs(loss - trained) / trained <= 1e-5, (loss, trained)


def test_zero2_epoch_resamples_losses_export_tensorboard(ranks):
    tmp, ranks = ranks
    check_run(ranks, "zero2", [4, 8])  # 4 steps per epoch; none after the last epoch
    check_export(tmp / "out", ranks, "zero2")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((tmp / "out" / "zero2" / "runs").glob("*"))
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    resamples = [(e.step, e.value) for e in acc.Scalars("train/rosa_resamples")]
    assert resamples[3] == (4, 1.0) and resamples[-1] == (12, 2.0)
    assert "eval/loss" in acc.Tags()["scalars"]


def test_zero3_grad_accum_step_resamples_and_exact_resume(ranks):
    tmp, ranks = ranks
    check_run(ranks, "zero3", [2, 4])
    check_export(tmp / "out", ranks, "zero3")
    for r in ranks:  # resumed between the two resamples: the next steps and the end state bit for bit
        run, resumed = r["zero3"]["run"], r["zero3"]["resumed"]
        assert resumed["order_ok"]
        assert resumed["losses"] == {k: v for k, v in run["losses"].items() if int(k) > 3}
        assert [e["index"] for e in resumed["events"]] == [1, 2]
        assert resumed["final"] == run["final"] and resumed["eval_loss"] == run["eval_loss"]
