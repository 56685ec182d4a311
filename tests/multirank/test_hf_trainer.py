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

from tests.helpers.assets import save_tiny_model_dir
from tests.helpers.launch import launch_accelerate, launch_deepspeed
from tests.helpers.models import ds_test_config, tiny_model

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


def check_run(ranks: list[dict], case: str, resample_steps: list[int], head: bool = True) -> None:
    runs = [r[case]["run"] for r in ranks]
    assert all(r["order_ok"] for r in runs), "the Trainer fed other batches than the reference's order"
    assert [e["step"] for e in runs[0]["events"]] == resample_steps
    assert [s["step"] for s in runs[0]["resamples"]] == resample_steps
    for i in range(len(resample_steps)):
        assert runs[0]["resamples"][i]["sums"] == runs[1]["resamples"][i]["sums"], f"ranks differ after resample {i}"
        for r in runs:
            assert r["resamples"][i]["factor_state_sizes"] and not any(r["resamples"][i]["factor_state_sizes"])
            heads = r["resamples"][i]["head_state_sizes"]
            assert (heads and all(heads)) if head else heads == []
    if len(resample_steps) > 1:
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


# --- TRL's own SFTTrainer: the three entry points ---------------------------------------------------

@pytest.fixture(scope="module")
def trl_model_dir(tmp_path_factory):
    """A tiny Llama with its tokenizer (SFTTrainer loads the processing class from the model)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("trl_model"), "llama")


def check_logged(ranks: list[dict], case: str, resample_steps: list[int]) -> None:
    """``rosa_resamples`` is in ``trainer.state.log_history`` at every logged step, counting the
    resamples done by then (trainer_state.json is written from it)."""
    logged = ranks[0][case]["run"]["logged_resamples"]
    steps = sorted(int(k) for k in ranks[0][case]["run"]["losses"])
    assert logged == [[s, sum(r <= s for r in resample_steps)] for s in steps]


@pytest.fixture(scope="module")
def trl_ranks(tmp_path_factory, trl_model_dir):
    tmp = tmp_path_factory.mktemp("trl_runs")
    launch_deepspeed(SCRIPT, ["--model-dir", str(trl_model_dir), "--out", str(tmp / "out"), "--result-dir",
                              str(tmp / "results"), "--cases", "trl_zero2", "trl_zero3"], tmp / "cache", timeout=400)
    return tmp, [json.loads((tmp / "results" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_trl_sft_with_rosa_zero2_deepspeed(trl_ranks):
    """``with_rosa(SFTTrainer)(model=<object>, rosa_config=...)``, ``deepspeed`` launcher, ZeRO-2."""
    tmp, ranks = trl_ranks
    check_run(ranks, "trl_zero2", [4])  # 2 epochs of 4 steps: the epoch-end resample, none after the last
    check_logged(ranks, "trl_zero2", [4])
    check_export(tmp / "out", ranks, "trl_zero2")


def test_trl_sft_peft_config_model_by_path_zero3_deepspeed(trl_ranks):
    """``with_rosa(SFTTrainer)(model="<path>", peft_config=RosaConfig(...))``, ZeRO-3 (loaded
    partitioned), gradient accumulation 2, every 2 of 4 steps: no resample after the final step."""
    tmp, ranks = trl_ranks
    assert all(r["trl_zero3"]["run"]["partitioned"] for r in ranks)
    check_run(ranks, "trl_zero3", [2])
    check_logged(ranks, "trl_zero3", [2])
    check_export(tmp / "out", ranks, "trl_zero3")


def test_trl_sft_rosa_callback_alone_zero3_accelerate(tmp_path, trl_model_dir):
    """``SFTTrainer(callbacks=[RosaCallback(RosaConfig(rank=2), ScheduleConfig(3))])``, nothing else
    from rosa_ds, under ``accelerate launch --use_deepspeed`` ZeRO-3 (its own config file, models
    built partitioned): 6 steps, a resample after step 3 and none after the final step 6."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ds_test_config(3, "fp32", 2, lr=1e-3)))
    launch_accelerate(SCRIPT, ["--model-dir", str(trl_model_dir), "--out", str(tmp_path / "out"), "--result-dir",
                               str(tmp_path / "results"), "--cases", "trl_callback_zero3", "--accelerate-config",
                               str(config)], config, timeout=400)
    ranks = [json.loads((tmp_path / "results" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["trl_callback_zero3"]["run"]["partitioned"] for r in ranks)
    check_run(ranks, "trl_callback_zero3", [3], head=False)
    check_logged(ranks, "trl_callback_zero3", [3])
    check_export(tmp_path / "out", ranks, "trl_callback_zero3")


# --- the Trainer example from an empty model cache --------------------------------------------------

LOCK_ORDER = '''
import fcntl, os, time
_flock = fcntl.flock


def _ordered_flock(fd, op):
    """Conversion locks only: the rank named by ROSA_TEST_SLOW_RANK asks for the lock late, so the
    other rank converts; each rank records when it holds the lock."""
    path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
    ours = "/models/." in path and op & fcntl.LOCK_EX
    if ours and os.environ.get("RANK") == os.environ["ROSA_TEST_SLOW_RANK"]:
        time.sleep(8)
    _flock(fd, op)
    if ours:
        with open(os.environ["ROSA_TEST_LOCK_LOG"], "a") as log:
            log.write(os.environ.get("RANK", "?") + "\\n")


fcntl.flock = _ordered_flock
'''


def test_trainer_example_from_an_empty_model_cache(tmp_path, winner: int = 1):
    """``deepspeed --num_gpus 2 examples/hf_trainer.py --model tiny.gguf`` with an empty model
    cache: the GGUF is converted once, by whichever rank takes the lock first, and the run trains
    and exports a model that reloads. Rank ``winner`` = 1 is made to win (rank 0 asks for the
    lock 8 s late), deterministically: that is the case that failed (a converting rank other
    than 0 wrote no files once the process group existed); rank 0 winning is the common case."""
    import transformers as tf

    from tests.helpers.assets import write_tiny_gguf
    from tests.helpers.launch import ROOT

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(LOCK_ORDER)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    env = {"PYTHONPATH": f"{site}:{ROOT}", "ROSA_TEST_SLOW_RANK": str(1 - winner),
           "ROSA_TEST_LOCK_LOG": str(tmp_path / "locks.txt")}
    launch_deepspeed(ROOT / "examples" / "hf_trainer.py",
                     ["--output-dir", str(tmp_path / "out"), "--model", str(gguf), "--max-train-samples", "16",
                      "--max-eval-samples", "8", "--seq-len", "96", "--micro-batch", "4", "--epochs", "1",
                      "--rank", "2"], tmp_path / "cache", timeout=300, extra_env=env)
    assert (tmp_path / "locks.txt").read_text().split()[0] == str(winner)
    converted = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1 and (converted[0] / "config.json").is_file(), converted
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert not any("rosa" in n for n, _ in model.named_parameters())


def test_trl_zero3_arguments_first_on_cpu_ranks(tmp_path, trl_model_dir):
    """The README's ZeRO-3 order on CPU ranks (arguments first, then the model by path): loaded
    partitioned (accelerate started gloo without DeepSpeed; ``adopt_process_group``), the
    template's WarmupDecayLR dropped so the Trainer's constant schedule runs, no resample after
    the final step 4 of a resample-every-2 schedule."""
    result = tmp_path / "result.json"
    launch_deepspeed(Path(__file__).parent / "scripts" / "hf_args_first_rank.py",
                     ["--model-dir", str(trl_model_dir), "--out", str(tmp_path / "out"), "--result", str(result)],
                     tmp_path / "cache", timeout=300)
    got = json.loads(result.read_text())
    assert got["partitioned"] and not got["scheduler_in_config"]
    assert got["lrs"] == [got["expected_lr"]] * 4 and got["resample_steps"] == [2]
