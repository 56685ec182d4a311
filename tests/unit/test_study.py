"""The ROSA vs LoRA study's tooling: metrics against references, the scorer against one-sample
forwards and unbatched generation, the resumable plan, the splits and the verdict rules."""
import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import study, study_plan, study_report
from bench.study_eval import greedy, mean_target_loss
from bench.textmetrics import corpus_bleu, corpus_rouge_l, lcs_length, rouge_l, rouge_tokens
from rosa_ds.recipe.data.collate import PadCollator
from tests.helpers.models import tiny_model

# ---------------------------------------------------------------- metrics

def _lcs_brute(a, b) -> int:
    """Longest common subsequence by enumerating a's subsequences (tiny inputs only)."""
    def is_subseq(s, t):
        it = iter(t)
        return all(x in it for x in s)

    return max((k for k in range(len(a), -1, -1) for c in itertools.combinations(a, k) if is_subseq(c, b)),
               default=0)


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _lcs_brute(a, b)


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
    assert rouge_l("The cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c d" = 3: P = 3/4, R = 3/5 -> F = 2PR/(P+R) = 2/3
    assert rouge_l("a c e d", "a b c d f") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert rouge_l("Hello, World!", "hello world") == 1.0  # case and punctuation are not tokens
    assert rouge_l("", "hello") == 0.0 and rouge_l("x y", "z") == 0.0
    assert corpus_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        corpus_rouge_l(["a"], [])


def test_bleu_perfect_and_disjoint():
    perfect = corpus_bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"])
    if perfect is None:
        pytest.skip("sacrebleu not installed")
    assert perfect == pytest.approx(100.0)
    assert corpus_bleu(["xx yy zz ww"], ["the cat sat on the mat"]) == pytest.approx(0.0)


# ---------------------------------------------------------------- the scorer

def test_mean_target_loss_is_the_token_mean_of_one_sample_forwards():
    torch.manual_seed(0)
    model = tiny_model("llama", pad_token_id=0, eos_token_id=1, bos_token_id=2).eval()
    rng = random.Random(1)
    split = []
    for n in (5, 9, 3, 12, 7):
        ids = [rng.randrange(3, 60) for _ in range(n)]
        labels = [-100] * (n // 2) + ids[n // 2:]
        split.append({"input_ids": ids, "labels": labels})
    total = count = 0.0
    with torch.no_grad():
        for s in split:
            b = PadCollator(0)([s])
            k = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * k
            count += k
    assert mean_target_loss(model, split, pad_id=0, batch=3) == pytest.approx(total / count, rel=1e-5)


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time():
    torch.manual_seed(0)
    model = tiny_model("llama", pad_token_id=0, eos_token_id=1, bos_token_id=2).eval()
    rng = random.Random(2)
    # widths 1..30 in one batch: short rows carry long left padding, which a mask or position bug corrupts
    prompts = [[rng.randrange(3, 120) for _ in range(n)] for n in (1, 30, 7, 2, 19, 25, 4, 13)]
    batched = greedy(model, prompts, pad_id=0, max_new_tokens=12, batch=8, eos_id=1)

    def upto_eos(ids):  # a batched row pads after its EOS; alone, generation stops there
        return ids[:ids.index(1) + 1] if 1 in ids else ids

    for p, got in zip(prompts, batched):
        alone = greedy(model, [p], pad_id=0, max_new_tokens=12, batch=1, eos_id=1)[0]
        assert upto_eos(got) == upto_eos(alone) and len(upto_eos(got)) >= 1


# ---------------------------------------------------------------- plan, resume, splits

TINY = replace(study_plan.SCALES["cpu"],
               lrs={"rosa": (5e-4, 1e-3, 2e-3), "lora": (5e-4, 1e-3, 2e-3), "full": (1e-5, 2e-5)},
               ranks=(2, 8), seeds=(0, 1))


def _fake_runner(calls: list, fail: set = frozenset(), diverge: set = frozenset()):
    def run(scale, r, splits, runs_dir):
        calls.append(r.name)
        rc = 1 if r.name in fail else 3 if r.name in diverge else 0
        base = {"name": r.name, "task": r.task, "config": r.config, "method": r.method, "rank": r.rank, "seed": r.seed,
                "lr": r.lr, "variant": r.variant, "phase": r.phase, "started": "2026-12-01T00:00:00", "flags": ["--x"],
                "train_wall_seconds": 1.0, "returncode": rc, "trainable": 100 * max(r.rank, 1)}
        if rc:
            return base
        if r.task == "cls":
            return {**base, "accuracy_final": 0.9 + 0.001 * r.seed, "macro_f1_final": 0.9}
        # validation loss lowest at lr 1e-3 (full: 1e-5 ... 2e-5 tie -> 1e-5, then 5e-6 below it);
        # ROSA lower test loss than LoRA
        val = 3.0 + 0.1 * abs(math.log2(r.lr / (1e-3 if r.method != "full" else 1e-5))) + 0.01 * r.seed
        test = val - (0.2 if r.method == "rosa" else 0.0)
        return {**base, "val_loss": val, "test_loss": test, "rouge_l": 30.0 - test, "bleu": 5.0,
                "test_perplexity": 20.0, "eval_seconds": 1.0}
    return run


def test_drive_resumes_skips_finished_and_retries_failures_next_time(tmp_path):
    path, runs = tmp_path / "study.json", tmp_path / "runs"
    calls: list = []
    study.drive(TINY, path, runs, max_runs=5, runner=_fake_runner(calls))
    assert len(calls) == 5
    first = list(calls)
    bad = "lm-lora-r8-lr0.002-s0"
    study.drive(TINY, path, runs, runner=_fake_runner(calls, fail={bad}))
    assert not set(first) & set(calls[5:])  # finished runs are not run again
    assert calls.count(bad) == 1  # a failure is not retried in the same sitting
    data = json.loads(path.read_text())
    assert not study_plan.finished(data["runs"][bad])
    assert "lm-lora-r8-lr0.001-s1" not in data["runs"]  # its grid is not finished: no seeds yet
    assert data["runs"]["lm-rosa-r8-lr0.001-s1"]["phase"] == "seeds"  # ROSA r=8 grid chose 1e-3
    n = len(calls)
    study.drive(TINY, path, runs, runner=_fake_runner(calls))  # the failed run again, then its seeds
    assert calls[n] == bad and "lm-lora-r8-lr0.001-s1" in calls[n:]
    n = len(calls)
    data = study.drive(TINY, path, runs, runner=_fake_runner(calls))
    assert len(calls) == n  # everything finished: a rerun trains nothing
    assert len(data["sittings"]) == 3  # the empty rerun is not a sitting
    names = {r.name for r in study_plan.plan(TINY, data["runs"])}
    assert names == set(data["runs"])
    assert {f"lm-rosa-r8-{v}-lr0.001-s{s}" for v in study_plan.VARIANTS for s in (0, 1)} <= names


def test_a_diverged_grid_run_is_finished_and_never_chosen(tmp_path):
    calls: list = []
    one = study_plan.StudyRun("lm", "rosa", 8, 0, 1e-3).name
    data = study.drive(TINY, tmp_path / "s.json", tmp_path / "r", max_runs=14,
                       runner=_fake_runner(calls, diverge={one}))
    assert study_plan.finished(data["runs"][one])
    grid = study_plan.grid(TINY, "rosa", 8, data["runs"])
    assert study_plan.chosen_lr(grid, data["runs"]) == 5e-4  # 5e-4 and 2e-3 tie: the lower, then bracketed by 2.5e-4
    assert [r.lr for r in study_plan.grid(TINY, "rosa", 8, data["runs"])] == [2.5e-4, 5e-4, 1e-3, 2e-3]


def test_splits_are_fixed_disjoint_and_sized(tmp_path):
    out, desc = study.write_splits(TINY, tmp_path / "a")
    _, again = study.write_splits(TINY, tmp_path / "b")
    assert desc == again  # the same files from the same corpus, whoever writes them
    keys = {p: [json.loads(x)["key"] for x in (out / f"{p}.jsonl").read_text().splitlines()]
            for p in ("train", "val", "test", "cls_train", "cls_test")}
    assert (len(keys["train"]), len(keys["val"]), len(keys["test"])) == (512, 150, 200)
    assert not set(keys["train"]) & set(keys["val"]) and not set(keys["val"]) & set(keys["test"])
    assert not set(keys["train"]) & set(keys["test"]) and not set(keys["cls_train"]) & set(keys["cls_test"])
    # the corpus repeats leads and headlines under other file names: no text may cross a split

    def texts(part):
        rows = [json.loads(x) for x in (out / f"{part}.jsonl").read_text().splitlines()]
        if part.startswith("cls"):
            return {" ".join(rouge_tokens(r["text"].split("\n")[i])) for r in rows for i in (0, 1)}
        return {" ".join(rouge_tokens(t)) for r in rows for t in (r["prompt"].split("\n")[0], r["target"])}

    for a, b in (("train", "val"), ("train", "test"), ("val", "test"), ("cls_train", "cls_test")):
        assert not texts(a) & texts(b), (a, b)
    assert desc["duplicate_groups"] > 100  # the grouping is exercised: the corpus has ~160 repeats
    row = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("Article: ") and row["target"].startswith(" ")


def test_run_flags_name_the_fixed_files_and_the_method():
    r = study_plan.StudyRun("lm", "rosa", 8, 1, 5e-4, "no-resample", "ablation")
    flags = r.flags(TINY, Path("S"))
    assert flags[flags.index("--dataset") + 1] == "S/train.jsonl" and "--eval-dataset" in flags
    assert flags[-2:] == ("--resample-every", "never") and flags[flags.index("--lr") + 1] == "0.0005"
    lora = study_plan.StudyRun("lm", "lora", 8, 0, 1e-3).flags(TINY, Path("S"))
    assert "--resample-every" not in lora


# ---------------------------------------------------------------- verdicts and report

def _groups(rosa: list, lora: list) -> dict:
    return {"lm-rosa-r8": {"test_loss": rosa}, "lm-lora-r8": {"test_loss": lora}}


def test_compare_is_welchs_t_test():
    assert study_report.compare([2.0, 2.1, 2.05], [3.0, 3.1, 3.05])["better"] == "a"
    assert study_report.compare([2.0, 2.5, 3.0], [2.1, 2.6, 3.1])["better"] == "tie"
    assert study_report.compare([0.9, 0.91], [0.8, 0.81], lower_better=False)["better"] == "a"
    assert study_report.compare([2.0], [3.0, 3.1]) is None
    # equal variances, 3 + 3: df = 4, t = 2.776; diff 0.1, se = 0.05 * sqrt(2/3) = 0.0408 -> t = 2.45: a tie
    c = study_report.compare([1.0, 1.05, 1.1], [1.1, 1.15, 1.2])
    assert c["df"] == pytest.approx(4.0) and c["better"] == "tie"
    # unequal variances lower df (here ~2: t = 4.30): diff 0.3 over se 0.0866 = 3.46 > 2.78 but < 4.30: a tie
    c = study_report.compare([1.0, 1.15, 1.3], [1.45, 1.4501, 1.4502])
    assert 2.0 <= c["df"] < 3.0 and c["better"] == "tie"
    assert study_report.compare([0.96] * 3, [0.9575] * 3)["better"] == "tie"  # no spread: no decision


def test_evidence_names_the_metric_and_keeps_config_names_intact():
    c = study_report.compare([3.22, 3.20, 3.25], [3.17, 3.18, 3.175])
    said = study_report._say(c, "ROSA r=8", "rosa-r8-no-resample")
    assert said.startswith("test loss: ROSA r=8 − rosa-r8-no-resample = +0.048 (s.e. ")
    assert said.endswith("better: neither (within noise)")
    c = study_report.compare([24.0, 24.2, 24.1], [25.0, 25.1, 25.2], lower_better=False)
    said = study_report._say(c, "ROSA", "LoRA", "+.2f", "ROUGE-L")
    assert said.startswith("ROUGE-L: ROSA − LoRA = −1.00 (") and said.endswith("better: LoRA")


def test_decide_waits_for_complete_evidence():
    a, b, tie = {"better": "a"}, {"better": "b"}, {"better": "tie"}

    def done(*cs):
        return [(c, True) for c in cs]

    assert study_report.decide([(b, False)]) == "pending"  # never "contradicted" before its runs are done
    assert study_report.decide(done(a, a, a)) == "shown"
    assert study_report.decide(done(a, b, a)) == "contradicted"
    assert study_report.decide(done(a, tie, a)) == "not shown"
    assert study_report.decide(done(a, None)) == "not shown"
    # a finished rank against the claim settles it while another rank is still running; a win does not
    assert study_report.decide([(b, True), (a, False)]) == "contradicted"
    assert study_report.decide([(a, True), (b, False)]) == "pending"
    assert study_report.decide([(a, True), (a, False)]) == "pending"


def test_report_from_a_finished_fake_study_has_verdicts_tables_and_plot(tmp_path):
    path = tmp_path / "study.json"
    study.drive(TINY, path, tmp_path / "r", runner=_fake_runner([]))
    md = study_report.write(path, TINY)
    text = md.read_text()
    data = json.loads(path.read_text())
    verdict = {c: v for c, v, _ in study_report.verdicts(study_report.summary(data, TINY), TINY,
                                                         study_report.complete_configs(data, TINY))}
    # the fake ROSA is 0.2 lower on test loss at every rank, the same at every seed spread
    assert verdict["ROSA beats LoRA at equal trainable parameters"] == "shown"
    assert verdict["Resampling the subspace helps (vs one fixed subspace)"] == "not shown"  # identical fakes
    assert "| lm-rosa-r8 | 800 | 0.001 |" in text and "**shown**" in text
    assert (tmp_path / "study_rank.png").is_file()


def test_report_on_partial_data_with_a_diverged_seed_and_a_crash(tmp_path):
    path = tmp_path / "study.json"
    diverged, crashed = "lm-rosa-r8-lr0.001-s1", "lm-rosa-r2-lr0.001-s0"

    def runner(scale, r, splits, runs_dir):
        if r.name == crashed:
            raise TimeoutError("scorer timed out")
        return _fake_runner([], diverge={diverged})(scale, r, splits, runs_dir)

    data = study.drive(TINY, path, tmp_path / "r", max_runs=20, runner=runner)
    assert data["runs"][crashed]["returncode"] == "exception TimeoutError"  # recorded; the sitting went on
    assert study_plan.finished(data["runs"][diverged]) and len(data["runs"]) == 20
    data = study.drive(TINY, path, tmp_path / "r", max_runs=1, runner=runner)  # the crash, retried once
    assert data["runs"][crashed]["attempts"] == 2 and study_plan.gave_up(data["runs"][crashed])
    groups = study_report.summary(data, TINY)
    assert groups["lm-rosa-r8"]["failed"] == 1 and len(groups["lm-rosa-r8"]["test_loss"]) == 1
    v = {c: s for c, s, _ in study_report.verdicts(groups, TINY, study_report.complete_configs(data, TINY))}
    assert v["ROSA beats LoRA at equal trainable parameters"] == "pending"  # R=2 seeds not run yet
    text = study_report.write(path, TINY).read_text()
    assert "1 seed(s) diverged or failed, left out" in text and "failed" in text


def test_resample_every_and_sizes_of_the_cpu_scale():
    cpu = study_plan.SCALES["cpu"]
    steps = cpu.train // (cpu.nproc * cpu.micro_batch) * cpu.epochs
    assert steps == 128 and steps // cpu.resample_every == 4
    assert min(cpu.val, cpu.test) >= 150 and cpu.seeds == (0, 1, 2) and cpu.ranks == (2, 8, 32)


def test_a_best_rate_at_the_grid_edge_extends_the_grid(tmp_path):
    def runner(scale, r, splits, runs_dir):  # validation loss falls with the rate: the edge is never the optimum
        rec = _fake_runner([])(scale, r, splits, runs_dir)
        if r.task == "lm" and r.phase == "grid":
            rec["val_loss"] = 3.0 - r.lr
        return rec

    path = tmp_path / "s.json"
    data = study.drive(TINY, path, tmp_path / "r", runner=runner)
    grid = study_plan.grid(TINY, "rosa", 8, data["runs"])
    assert [r.lr for r in grid] == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]  # two factor-2 steps past the edge, then stop
    assert study_plan.chosen_lr(grid, data["runs"]) == 8e-3
    assert data["runs"]["lm-rosa-r8-lr0.008-s1"]["phase"] == "seeds"
    assert "(grid edge after 2 extensions)" in study_report.write(path, TINY).read_text()


def test_the_plan_puts_claim_ablations_before_other_ranks_and_full_last(tmp_path):
    data = study.drive(TINY, tmp_path / "s.json", tmp_path / "r", runner=_fake_runner([]))
    configs = [r.config for r in study_plan.plan(TINY, data["runs"])]
    first = {c: i for i, c in reversed(list(enumerate(configs)))}
    claims = [first[f"lm-rosa-r8-{v}"] for v in study_plan.CLAIM_VARIANTS]
    assert max(claims) < first["lm-rosa-r2"] < first["lm-rosa-r8-init-lora"] < first["lm-full"]
    assert first["lm-lora-r8"] < min(claims)
