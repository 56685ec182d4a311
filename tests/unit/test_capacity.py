"""The capacity suite (issue 30) without training: its data, plan, statistics, report, and the
restarted learning-rate schedule against DeepSpeed's own scheduler."""
import json
import math
from pathlib import Path

import pytest
import torch

from bench import capacity_data, capacity_report
from bench.capacity_data import BLOCK, BlockSizes, article_blocks, fact_names, facts, split_articles, write_blocks
from bench.capacity_eval import recalled
from bench.capacity_plan import IDEA, SCALES, plan
from bench.paired_stats import min_detectable_effect, paired_t, sign_flip_p, t_power, t_two_sided_p
from bench.study import duplicate_groups
from rosa_ds.recipe.data.sources import read_bbc
from rosa_ds.schedule import ScheduleConfig, warmup_decay

CPU = SCALES["cpu"]


# ---------------------------------------------------------------- data

class CharTokenizer:
    """One id per character; ids >= 200 decode to '?', which re-tokenizes differently (a BPE merge
    across a cut, in miniature)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) if i < 200 else "?" for i in ids)


def test_article_blocks_are_exact_width_and_drop_blocks_that_do_not_round_trip():
    body = "a" * 10 + "d" * 2 + "b" * 9 + "\u00ff" + "c" * 7  # 29 chars; ÿ (255) does not round-trip
    blocks, dropped = article_blocks(CharTokenizer(), body, width=5)
    assert dropped == 1 and all(len(b) == 5 for b in blocks)
    assert blocks == ["aaaaa", "aaaaa", "ddbbb", "bbbbb"]  # the tail (4 chars) is not a block


def test_splits_keep_duplicate_groups_and_articles_apart():
    parts = split_articles(BlockSizes(train_blocks=10, val_articles=100, test_articles=200))
    keys = [k for ks in parts.values() for k in ks]
    assert len(keys) == len(set(keys)) and len(parts["test"]) >= 200 and len(parts["val"]) >= 100
    where = {k: name for name, ks in parts.items() for k in ks}
    for group in duplicate_groups(read_bbc("bbc-headlines").records):
        assert len({where[k] for k in group}) == 1


def test_written_blocks_are_exactly_one_row_of_the_trainer(tmp_path):
    from rosa_ds.recipe.data.encode import encode_text
    from rosa_ds.recipe.models import load_tokenizer

    desc = write_blocks(BlockSizes(train_blocks=6, val_articles=1, test_articles=1), tmp_path)
    assert desc["train"]["blocks"] == 6 and desc["test"]["blocks"] >= 1
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    held_out = {json.loads(x)["key"] for p in ("val", "test")
                for x in (tmp_path / f"{p}.jsonl").read_text().splitlines()}
    assert not held_out & {r["key"] for r in rows}

    class Ex:
        def __init__(self, text):
            self.values, self.loc = {"text": text}, "x"

    ids, labels, truncated = encode_text(load_tokenizer("default"), [Ex(r["text"]) for r in rows], BLOCK)
    assert truncated == 0 and all(len(x) == BLOCK for x in ids) and labels == ids  # no pad, loss on every token


def test_the_code_corpus_holds_out_whole_library_files_and_spaces_long_ones(tmp_path):
    """The second candidate: sympy's modules, no tests or benchmarks, whole files per split, at most
    ``per_doc`` blocks per file spread through it."""
    import sympy

    assert capacity_data.spaced(list("abcdefghij"), 4) == list("acfh")
    assert capacity_data.spaced(list("ab"), 4) == list("ab")
    desc = write_blocks(BlockSizes(train_blocks=12, val_articles=2, test_articles=2, corpus="sympy", per_doc=3),
                        tmp_path)
    assert desc["corpus"] == f"sympy {sympy.__version__} library modules" and desc["val"]["files"] == 2
    rows = {p: [json.loads(x) for x in (tmp_path / f"{p}.jsonl").read_text().splitlines()]
            for p in ("train", "val", "test")}
    keys = {p: [r["key"] for r in rs] for p, rs in rows.items()}
    assert len(rows["train"]) == 12 and not set(keys["train"]) & (set(keys["val"]) | set(keys["test"]))
    every = [k for ks in keys.values() for k in ks]
    assert all(k.endswith(".py") and not {"tests", "benchmarks"} & set(Path(k).parts) for k in every)
    assert max(every.count(k) for k in set(every)) <= 3
    with pytest.raises(SystemExit, match="unknown corpus 'wiki'; fix: bbc or sympy"):
        write_blocks(BlockSizes(1, 1, 1, corpus="wiki"), tmp_path)


def test_the_code_scale_leads_with_its_pilot_pair_and_runs_no_memorization_probe():
    code = SCALES["cpu-code"]
    runs = plan(code, {})
    assert [(r.method, r.lr) for r in runs[:2]] == list(code.pilot_lrs)
    assert not [r for r in runs if r.arm == "mem"] and {r.arm for r in runs} == {"a1", "a2"}


def test_facts_are_deterministic_unique_and_nested():
    assert facts(50) == facts(50) and facts(100)[:50] == facts(50)
    names = fact_names(2000)
    assert len(set(names)) == 2000
    row = facts(1)[0]
    assert row["prompt"].startswith("The locker code of ") and row["prompt"].endswith(" is")
    assert len(row["target"]) == 6 and row["target"][1:5].isdigit() and row["target"].endswith(".")


def test_exact_match_reads_the_leading_number():
    assert recalled("4821.", " 4821.") and recalled(" 4821 is it", " 4821.")
    assert not recalled("482", " 4821.") and not recalled("the code", " 4821.")


def test_the_greedy_budget_reads_the_whole_number_with_the_models_tokenizer():
    """A model that continues every prompt with its exact target (and then keeps talking) recalls
    every fact within the budget; 4 tokens (the first scorer's budget) recall none."""
    from bench.capacity_eval import answer_tokens
    from bench.study_eval import headline
    from rosa_ds.recipe.models import load_tokenizer

    tok, targets = load_tokenizer("default"), [f["target"] for f in facts(50)]
    budget = answer_tokens(tok, targets)
    said = [tok(t + " Next, the", add_special_tokens=False)["input_ids"] for t in targets]
    assert all(recalled(headline(tok, ids[:budget]), t) for ids, t in zip(said, targets))
    assert not any(recalled(headline(tok, ids[:4]), t) for ids, t in zip(said, targets))


# ---------------------------------------------------------------- the plan

def _done(val: float, **extra) -> dict:
    return {"returncode": 0, "val_loss": val, "test_loss": val + 0.1, **extra}


def test_plan_starts_with_the_capacity_check_and_names_seeds_after_the_grid():
    first = plan(CPU, {})
    pilot = ["a1-full-lr5e-05-s0", "a1-lora-r8-lr0.001-s0"]  # the study's chosen rates: the gap seen early
    grids = [f"a1-full-lr{x:g}-s0" for x in CPU.lrs["full"]] + [f"a1-lora-r8-lr{x:g}-s0" for x in CPU.lrs["lora"]]
    assert [r.name for r in first[:8]] == pilot + [n for n in grids if n not in pilot]
    assert all(r.phase == "grid" for r in first)  # nothing else is nameable yet
    # LoRA's grid finished: the best validation loss (an inner rate) picks the test seeds' rate
    records = {f"a1-lora-r8-lr{x:g}-s0": _done(v) for x, v in zip(CPU.lrs["lora"], (3.2, 3.0, 3.1, 3.3))}
    seeds = [r for r in plan(CPU, records) if r.config == "a1-lora-r8" and r.phase == "seeds"]
    assert [(r.seed, r.lr) for r in seeds] == [(1, 5e-4), (2, 5e-4), (3, 5e-4)]


def test_a_grid_runs_the_rates_next_to_its_best_first():
    """Full FT at 5e-5 beat 1e-5: 1e-4 (a factor 2 away) runs before 2e-5 (2.5 away), in the grid's slots."""
    records = {"a1-full-lr5e-05-s0": _done(3.42), "a1-full-lr1e-05-s0": _done(3.57)}
    runs = plan(CPU, records)
    todo = [r.name for r in runs if r.config == "a1-full" and r.name not in records]
    assert todo == ["a1-full-lr0.0001-s0", "a1-full-lr2e-05-s0"]
    assert [r.name for r in runs[:2]] == ["a1-full-lr5e-05-s0", "a1-lora-r8-lr0.001-s0"]  # the pilots still lead
    assert sorted(r.name for r in runs) == sorted(r.name for r in plan(CPU, {}))  # the same runs, reordered


def test_rosa_variants_run_at_rosas_rate_and_arm2_at_full_fts_sgd_rate():
    records = {f"a1-rosa-r8-rs64-lr{x:g}-s0": _done(v) for x, v in zip(CPU.lrs["rosa"], (3.2, 3.1, 3.0, 3.05))}
    records.update({f"a2-full-lr{x:g}-s0": _done(v) for x, v in zip(CPU.sgd_lrs, (3.3, 3.1, 3.2, 3.4))})
    runs = plan(CPU, records)
    variants = [r for r in runs if r.config.startswith("a1-rosa-r8-") and r.variant not in ("rs64", IDEA)]
    assert {r.variant for r in variants} == set(CPU.variants) and {r.lr for r in variants} == {1e-3}
    # Q4's idea changes what a rate does: its own grid (seed 0), no seeds before it is finished
    ours = [r for r in runs if r.variant == IDEA]
    assert [(r.lr, r.seed) for r in ours] == [(x, 0) for x in CPU.lrs["rosa"]]
    flags = ours[0].flags(CPU, Path("/d"))
    assert flags[flags.index("--factor-scale") + 1] == "uniform" and "--rewarmup-steps" not in flags
    assert flags[flags.index("--resample-every") + 1] == str(CPU.resample_every)
    rw = [r for r in variants if r.variant == "rs64-rw"][0].flags(CPU, Path("/d"))
    assert rw[rw.index("--rewarmup-steps") + 1] == str(CPU.rewarmup_steps) and "--factor-scale" not in rw
    arm2 = [r for r in runs if r.arm == "a2" and r.phase == "seeds"]
    assert {r.lr for r in arm2} == {1e-2} and {r.seed for r in arm2} == set(CPU.arm2_seeds)
    flags = {r.config: r.flags(CPU, Path("/d")) for r in arm2}
    assert "--lora-init" in flags["a2-lora-r8"] and "--optim" in flags["a2-lora-r32"]
    rosa = flags["a2-rosa-r8"]
    assert "--restart-schedule" in rosa and rosa[rosa.index("--resample-every") + 1] == str(CPU.epoch_equivalent)
    growth = [r for r in runs if r.arm == "growth"]
    assert [r.variant for r in growth] == [f"every{n}" for n in CPU.growth_every] and growth[0].lr == 1e-3


def test_lm_flags_train_one_pass_of_plain_text_blocks():
    run = plan(CPU, {})[0]
    flags = run.flags(CPU, Path("/d"))
    for flag, value in (("--text-field", "text"), ("--seq-len", "128"), ("--epochs", "1"), ("--seed", "0")):
        assert flags[flags.index(flag) + 1] == value
    assert CPU.steps == 250 and CPU.epoch_equivalent == 84


# ---------------------------------------------------------------- statistics

def test_t_test_p_values_are_exact():
    assert t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)  # closed form at df 2
    assert t_two_sided_p(1.5, 1) == pytest.approx(1 - 2 / math.pi * math.atan(1.5), abs=1e-12)  # Cauchy
    assert t_two_sided_p(2.228138852, 10) == pytest.approx(0.05, abs=1e-8)  # the table's t(0.975, 10)
    res = paired_t([3.0, 3.2, 3.1], [3.1, 3.25, 3.3])  # differences -0.1, -0.05, -0.2
    d = [-0.1, -0.05, -0.2]
    t = (sum(d) / 3) / (torch.tensor(d).std().item() / math.sqrt(3))
    assert res["df"] == 2 and res["t"] == pytest.approx(t) and res["p"] == pytest.approx(t_two_sided_p(t, 2))


def test_sign_flip_is_exact_over_all_patterns():
    assert sign_flip_p([0.1, 0.2, 0.3]) == 0.25  # only all-plus and all-minus are as extreme: 2 / 8
    assert sign_flip_p([0.3, -0.1, 0.2, 0.05]) == pytest.approx(6 / 16)  # |sum| >= 0.45: 6 of 16 patterns


def test_min_detectable_effect_has_the_asked_power():
    assert t_power(0.0, 2) == pytest.approx(0.05, abs=1e-6)  # no effect: power is the level
    mde = min_detectable_effect(1.0, 3)
    assert t_power(mde * math.sqrt(3), 2) == pytest.approx(0.8, abs=1e-3)
    large = min_detectable_effect(1.0, 400) * math.sqrt(400)  # normal limit: z(0.975) + z(0.8) = 2.8016
    assert large == pytest.approx(2.8016, rel=0.01)


# ---------------------------------------------------------------- restarted schedule

def test_restart_schedule_reproduces_a_fresh_deepspeed_scheduler_after_each_resample():
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    def lrs_of(n):  # the rates DeepSpeed's scheduler gives n optimizer steps from a fresh start
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = WarmupDecayLR(opt, total_num_steps=20, warmup_num_steps=4, warmup_max_lr=1.0,
                                   warmup_type="linear"), []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, sched

    cfg, every = ScheduleConfig(6, restart_schedule=True), 6
    base, sched = lrs_of(0)
    used, last = [], None
    opt = sched.optimizer
    for k in range(18):  # k applied steps so far; resamples after steps 6 and 12
        since = None if last is None else k - last
        used.append(opt.param_groups[0]["lr"] * cfg.lr_factor(since, (sched.last_batch_iteration, 4, 20)))
        opt.step()
        sched.step()
        if cfg.due_after_step(k + 1):
            last = k + 1
    fresh, _ = lrs_of(every)
    full, _ = lrs_of(18)
    assert used[:6] == pytest.approx(full[:6])  # before the first resample: the run's own schedule
    assert used[6:12] == pytest.approx(fresh) and used[12:18] == pytest.approx(fresh)
    assert warmup_decay(-1, 4, 20) == 0.0 and warmup_decay(2, 4, 20) == 0.5 and warmup_decay(20, 4, 20) == 0.0
    assert ScheduleConfig(6).lr_factor(2, (10, 4, 20)) == 1.0  # off: the schedule is untouched


# ---------------------------------------------------------------- the report

def test_report_with_no_results_states_the_rule_and_every_run_todo(tmp_path):
    md = capacity_report.write(tmp_path / "capacity.json", CPU).read_text()
    assert "## Decision rule" in md and "paired t-test" in md and "sign-flip" in md
    assert "**pending**" in md and "| 1 | a1-full-lr5e-05-s0 | grid | todo |" in md
    assert "| done |" not in md and not (tmp_path / "capacity.json").exists()


def test_capacity_check_and_q1_follow_the_decision_rule(tmp_path):
    runs = {}
    for method, lrs, base in (("full", CPU.lrs["full"], 3.0), ("lora-r8", CPU.lrs["lora"], 3.1)):
        for x in lrs:
            runs[f"a1-{method}-lr{x:g}-s0"] = {"name": f"a1-{method}-lr{x:g}-s0", "config": f"a1-{method}",
                                               "seed": 0, "lr": x, "phase": "grid", "started": "0",
                                               **_done(base + (0 if x == lrs[1] else 0.2))}
        for s, jitter in zip((1, 2, 3), (0.0, 0.01, -0.005)):
            runs[f"a1-{method}-lr{lrs[1]:g}-s{s}"] = {"name": "x", "config": f"a1-{method}", "seed": s, "lr": lrs[1],
                                                      "phase": "seeds", "started": "1", "returncode": 0,
                                                      "val_loss": base, "test_loss": base + jitter}
    (tmp_path / "capacity.json").write_text(json.dumps({"scale": "cpu", "sittings": [], "runs": runs}))
    md = capacity_report.write(tmp_path / "capacity.json", CPU).read_text()
    assert "**capacity-bound**: test loss: full FT − LoRA r=8 = −0.1000" in md  # same jitter: sd 0, p 0
    assert "| Q1. ROSA r=8 beats LoRA r=8 where capacity binds (Arm 1, tuned AdamW) | **pending** |" in md


def _grids(full_best: float, lora_best: float) -> dict:
    """Finished seed-0 grids of full FT and LoRA r=8, each best at an inner rate."""
    runs = {}
    for method, lrs, best in (("full", CPU.lrs["full"], full_best), ("lora-r8", CPU.lrs["lora"], lora_best)):
        for x in lrs:
            name = f"a1-{method}-lr{x:g}-s0"
            runs[name] = {"name": name, "config": f"a1-{method}", "seed": 0, "lr": x, "phase": "grid", "started": "0",
                          **_done(best + (0 if x == lrs[1] else 0.05))}
    return runs


def test_the_screen_spends_no_test_seeds_on_a_task_where_full_ft_is_not_ahead(tmp_path):
    """Both grids first; then full FT's and LoRA's test seeds only if full FT's best validation loss is
    below LoRA's. ROSA's Arm-1 runs are named either way (Q3 and Q4 do not need the gap)."""
    first = [r.name for r in plan(CPU, {})]
    grids = [n for n in first if n.startswith(("a1-full-", "a1-lora-"))]
    assert first[:len(grids)] == grids  # no seed and no ROSA run before both grids
    failed = plan(CPU, _grids(3.38, 3.35))
    assert not [r for r in failed if r.config in ("a1-full", "a1-lora-r8") and r.phase == "seeds"]
    assert any(r.config == "a1-rosa-r8-rs64" for r in failed)
    passed = plan(CPU, _grids(3.30, 3.35))
    assert {(r.config, r.seed) for r in passed if r.phase == "seeds" and r.arm == "a1"} == {
        (c, s) for c in ("a1-full", "a1-lora-r8") for s in CPU.test_seeds}
    (tmp_path / "capacity.json").write_text(json.dumps({"scale": "cpu", "sittings": [], "runs": _grids(3.38, 3.35)}))
    md = capacity_report.write(tmp_path / "capacity.json", CPU).read_text()
    lrs = CPU.lrs
    assert (f"**not capacity-bound (screen)**: seed-0 validation loss, best of each grid: full FT 3.380 at "
            f"{lrs['full'][1]:g}, LoRA r=8 3.350 at {lrs['lora'][1]:g}; full FT is not lower, no test seeds") in md
    assert "| **not answerable at this size (task not capacity-bound)** |" in md


def test_a_second_sitting_on_the_same_results_is_refused_in_one_line(tmp_path):
    """Two sittings on one results file trained the same run into the same directory at once."""
    from bench.study import one_sitting

    results = tmp_path / "capacity.json"
    with one_sitting(results, "capacity"):
        with pytest.raises(SystemExit, match=r"another sitting is running on .*capacity.json \(pid \d+ since"):
            with one_sitting(results, "capacity"):
                pass
    with one_sitting(results, "capacity"):  # released when the first ended
        pass


def test_the_screen_fails_as_soon_as_lora_cannot_lose_and_the_memorization_probe_then_leads(tmp_path):
    """Full FT's grid finished and not below LoRA's best finished run: LoRA's remaining rates can
    only lower LoRA's best, so the screen fails without them, and the probe runs first."""
    runs = _grids(3.38, 3.35)
    lora_top = f"a1-lora-r8-lr{CPU.lrs['lora'][-1]:g}-s0"
    del runs[lora_top]
    assert plan(CPU, runs)[0].arm == "mem" and plan(CPU, _grids(3.38, 3.35))[0].arm == "mem"
    assert not [r for r in plan(CPU, runs) if r.config == "a1-full" and r.phase == "seeds"]
    assert lora_top in [r.name for r in plan(CPU, runs)]  # LoRA's grid still finishes, after the probe
    ahead = _grids(3.30, 3.35)
    del ahead[lora_top]  # full FT ahead of LoRA's runs so far: LoRA's last rate may still overtake it
    assert [r.name for r in plan(CPU, ahead) if r.name not in ahead][0] == lora_top
    (tmp_path / "capacity.json").write_text(json.dumps({"scale": "cpu", "sittings": [], "runs": runs}))
    md = capacity_report.write(tmp_path / "capacity.json", CPU).read_text()
    assert (f"LoRA r=8 3.350 at {CPU.lrs['lora'][1]:g} (grid unfinished: more runs can only lower it); full FT is "
            "not lower, no test seeds") in md


def test_the_memorization_grids_of_lora_and_rosa_alternate():
    names = [r.name for r in plan(CPU, {}) if r.arm == "mem"][:4]
    lrs = CPU.mem_lrs
    assert names == [f"mem-{m}-r8-n{CPU.facts_grid_n}-lr{lr:g}-s0" for lr in lrs["lora"][:2] for m in ("lora", "rosa")]


def test_planned_steps_count_the_facts_epochs():
    from bench.capacity_plan import CapacityRun, planned_steps

    assert planned_steps(CPU, CapacityRun("a1", "lora", 8, 0, 1e-3)) == 250
    assert planned_steps(CPU, CapacityRun("mem", "lora", 8, 0, 1e-3, n_facts=1000)) == 1250  # the trainer's count
    assert planned_steps(CPU, CapacityRun("mem", "lora", 8, 0, 1e-3, n_facts=250)) == 310  # 31 a epoch, as trained


def test_first_puts_named_runs_ahead_of_the_plan_and_refuses_others_in_one_line(tmp_path, capsys):
    from bench.capacity import main

    runs = _grids(3.38, 3.35)
    lora_edge = f"a1-lora-r8-lr{CPU.lrs['lora'][0]:g}-s0"
    del runs[lora_edge]
    (tmp_path / "capacity.json").write_text(json.dumps({"scale": "cpu", "sittings": [], "runs": runs}))
    main(["--results", str(tmp_path), "--first", lora_edge, "--plan"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"todo  {lora_edge}  (grid)" and lines[1].startswith("todo  mem-")
    for name, why in ((f"a1-full-lr{CPU.lrs['full'][0]:g}-s0", "is finished"), ("a1-x", "is not a run the plan names")):
        with pytest.raises(SystemExit, match=f"--first {name} {why}.*; fix: pick an unfinished run from"):
            main(["--results", str(tmp_path), "--first", name, "--plan"])
