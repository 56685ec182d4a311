"""The study's report: bench/results/study.md (tables, verdicts, every run) and study_rank.png.

Statistics: per configuration (method, rank, variant at its chosen learning rate) the mean and
the sample standard deviation (n - 1) over its successful seeds. Two configurations differ
"beyond noise" by Welch's two-sided t-test at 95%: |mean difference| > t(0.975, df) x
sqrt(s_a^2 / n_a + s_b^2 / n_b), df by Welch-Satterthwaite (rounded down: conservative). With
3 + 3 seeds df is 2-4, so t is 2.78-4.30. Fewer than 2 values on a side, or no spread at all:
no decision. A verdict is given only when every run its claim rests on is finished ("pending"
before), and a claim over several ranks is not corrected for the multiple comparisons.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from bench.hardware import one_line
from bench.study_plan import MAX_GRID_STEPS, SCALES, chosen_lr, finished, grid, plan, selection_loss

LOSS, ROUGE = "test_loss", "rouge_l"
# two-sided 95% quantiles of Student's t by degrees of freedom (floor); beyond 30: 1.96
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: float) -> float:
    below = [k for k in T975 if k <= max(df, 1)]
    return T975[max(below)] if df <= 30 else 1.96


# ---------------------------------------------------------------- numbers

def stats(values: list[float]) -> Optional[tuple[float, float, int]]:
    """(mean, sample std, n); std is 0 for a single value."""
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def compare(a: list[float], b: list[float], lower_better: bool = True) -> Optional[dict]:
    """a vs b by Welch's t-test: the mean difference, its standard error, df, and which is better
    beyond noise ('a', 'b' or 'tie'); None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    d = statistics.mean(a) - statistics.mean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # identical values within each side: no spread to judge a difference against
        return {"diff": d, "se": 0.0, "df": None, "better": "tie"}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    better_a = d < 0 if lower_better else d > 0
    beyond = abs(d) > t975(math.floor(df)) * se
    return {"diff": d, "se": se, "df": df, "better": ("a" if better_a else "b") if beyond else "tie"}


def _fmt(s: Optional[tuple], spec: str = ".3f") -> str:
    if s is None:
        return "–"
    mean, std, n = s
    return f"{mean:{spec}} ± {std:{spec}} (n={n})" if n > 1 else f"{mean:{spec}} (n=1)"


# ---------------------------------------------------------------- grouping

def finished_runs(data: dict) -> list[dict]:
    return [r for r in data["runs"].values() if finished(r)]


def chosen(data: dict, scale) -> dict[str, Optional[float]]:
    """config -> chosen learning rate (None while its grid is unfinished)."""
    out = {}
    for method, ranks in (("rosa", scale.ranks), ("lora", scale.ranks), ("full", (0,))):
        for rank in ranks:
            runs = grid(scale, method, rank, data["runs"])
            out[runs[0].config] = chosen_lr(runs, data["runs"])
    return out


def summary(data: dict, scale) -> dict[str, dict]:
    """config -> its seeds' values at the chosen rate (LM) or the task default (cls); ``failed``
    counts its seeds that diverged or were given up (left out of the statistics, shown)."""
    lrs = chosen(data, scale)
    rosa8 = lrs.get("lm-rosa-r8")
    groups: dict[str, dict] = {}
    for r in finished_runs(data):
        if r["task"] == "lm":
            want = rosa8 if r["variant"] else lrs.get(r["config"])
            if want is None or r["lr"] != want:
                continue
        g = groups.setdefault(r["config"], {"method": r["method"], "rank": r["rank"], "variant": r["variant"],
                                            "task": r["task"], "lr": r["lr"], "trainable": None, "runs": [],
                                            "failed": 0})
        if r.get("returncode") != 0:
            g["failed"] += 1
            continue
        g["runs"].append(r)
        g["trainable"] = g["trainable"] or r.get("trainable")
    for g in groups.values():
        for key in (LOSS, ROUGE, "bleu", "test_perplexity", "accuracy_final", "macro_f1_final", "train_wall_seconds",
                    "eval_seconds"):
            g[key] = [r[key] for r in g["runs"] if r.get(key) is not None]
    return groups


def complete_configs(data: dict, scale) -> set[str]:
    """Configs whose every named run is finished (main LM configs: grid and seeds)."""
    state: dict[str, bool] = {}
    for r in plan(scale, data["runs"]):
        state[r.config] = state.get(r.config, True) and finished(data["runs"].get(r.name))
    return {c for c, done in state.items() if done}


# ---------------------------------------------------------------- verdicts

def _pair(groups: dict, a: str, b: str, key: str, lower_better: bool = True) -> Optional[dict]:
    if a not in groups or b not in groups:
        return None
    return compare(groups[a][key], groups[b][key], lower_better)


def _say(c: Optional[dict], a: str, b: str, spec: str = "+.3f", metric: str = "test loss") -> str:
    """One comparison in words: "test loss: a − b = +0.075 (s.e., t, df), better: b"."""
    if c is None:
        return f"{metric}: {a} vs {b}: fewer than 2 seeds on a side"
    who = {"a": a, "b": b, "tie": "neither (within noise)"}[c["better"]]
    t = f", t = {abs(c['diff']) / c['se']:.2f} at df {c['df']:.1f}" if c["se"] else ""
    diff = f"{c['diff']:{spec}}".replace("-", "−")
    return f"{metric}: {a} − {b} = {diff} (s.e. {c['se']:.3f}{t}), better: {who}"


def decide(comparisons: list[tuple[Optional[dict], bool]]) -> str:
    """Verdict from (comparison, its configs all finished) pairs. A finished comparison that goes
    against the claim beyond noise contradicts it for good (no other rank can undo that): then
    contradicted; else pending until every comparison is finished; then shown if all go for the
    claim beyond noise, else not shown (ties, or too few seeds to compare). An unfinished
    comparison never decides: its learning rate may not be chosen yet."""
    if any(done and c is not None and c["better"] == "b" for c, done in comparisons):
        return "contradicted"
    if not all(done for _, done in comparisons):
        return "pending"
    if comparisons and all(c is not None and c["better"] == "a" for c, _ in comparisons):
        return "shown"
    return "not shown"


def verdicts(groups: dict, scale, complete: set[str]) -> list[tuple[str, str, str]]:
    """(claim, shown | not shown | contradicted | pending, evidence) per claim of the papers."""
    out = []

    def done(*configs: str) -> bool:
        return all(c in complete for c in configs)

    # 1. ROSA > LoRA at equal trainable parameters (test loss; ROUGE-L as a second view)
    per_rank = {R: _pair(groups, f"lm-rosa-r{R}", f"lm-lora-r{R}", LOSS) for R in scale.ranks}
    evid = ". ".join(f"R={R}: {_say(c, 'ROSA', 'LoRA')}; "
                     + _say(_pair(groups, f"lm-rosa-r{R}", f"lm-lora-r{R}", ROUGE, False), "ROSA", "LoRA", "+.2f",
                            "ROUGE-L") for R, c in per_rank.items())
    status = decide([(c, done(f"lm-rosa-r{R}", f"lm-lora-r{R}")) for R, c in per_rank.items()])
    out.append(("ROSA beats LoRA at equal trainable parameters", status, evid))

    # 2. ROSA improves with rank (LoRA's trend beside it)
    ranks = sorted(scale.ranks)
    steps = [(lo, hi, _pair(groups, f"lm-rosa-r{hi}", f"lm-rosa-r{lo}", LOSS)) for lo, hi in zip(ranks, ranks[1:])]
    lora_steps = [(lo, hi, _pair(groups, f"lm-lora-r{hi}", f"lm-lora-r{lo}", LOSS)) for lo, hi in zip(ranks, ranks[1:])]
    evid = "ROSA: " + "; ".join(_say(c, f"r{hi}", f"r{lo}") for lo, hi, c in steps) + \
        ". LoRA: " + "; ".join(_say(c, f"r{hi}", f"r{lo}") for lo, hi, c in lora_steps)
    status = decide([(c, done(f"lm-rosa-r{lo}", f"lm-rosa-r{hi}")) for lo, hi, c in steps])
    out.append(("ROSA improves with rank", status, evid))

    # 3. resampling helps; 4. random >= smallest (ablations at R = 8)
    for claim, other in (("Resampling the subspace helps (vs one fixed subspace)", "lm-rosa-r8-no-resample"),
                         ("Random subspaces are at least as good as the smallest singular triplets",
                          "lm-rosa-r8-smallest")):
        c = _pair(groups, "lm-rosa-r8", other, LOSS)
        out.append((claim, decide([(c, done("lm-rosa-r8", other))]),
                    _say(c, "ROSA r=8", other.replace("lm-", ""))))

    # 5. classification
    c = _pair(groups, "cls-rosa-r8", "cls-lora-r8", "accuracy_final", lower_better=False)
    out.append(("ROSA beats LoRA on classification (accuracy)", decide([(c, done("cls-rosa-r8", "cls-lora-r8"))]),
                _say(c, "ROSA r=8", "LoRA r=8", "+.4f", "accuracy")))
    return out


# ---------------------------------------------------------------- the document

def _lr_table(data: dict, scale) -> list[str]:
    lines = ["| config | validation loss per learning rate | chosen |", "|---|---|---|"]
    for config, pick in chosen(data, scale).items():
        method = config.split("-")[1]
        rank = 0 if method == "full" else int(config.rsplit("r", 1)[1])
        runs = grid(scale, method, rank, data["runs"])
        cells = []
        for r in runs:
            rec = data["runs"].get(r.name)
            val = ("–" if not finished(rec) else f"{rec['val_loss']:.3f}" if selection_loss(rec) < float("inf")
                   else "diverged" if rec.get("returncode") == 3 else "failed")
            cells.append(f"{r.lr:g}: {val}")
        lrs = [r.lr for r in runs]
        edge = ""
        if pick is not None and pick in (lrs[0], lrs[-1]):
            edge = f" (grid edge after {MAX_GRID_STEPS} extensions)"
        elif len(lrs) > len(scale.lrs[method]):
            edge = " (grid extended)"
        lines.append(f"| {config} | {', '.join(cells)} | {_lr(pick)}{edge} |")
    return lines


def _lr(x: Optional[float]) -> str:
    return "pending" if x is None else f"{x:g}"


def _table(groups: dict, configs: list[str], columns: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    """One row per config: its name, then each column's cell from its group ("not run yet" if none)."""
    lines = ["| config | " + " | ".join(h for h, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for c in configs:
        cells = [f(groups[c]) for _, f in columns] if c in groups else ["not run yet"] + [""] * (len(columns) - 1)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _result_table(groups: dict, configs: list[str]) -> list[str]:
    return _table(groups, configs, [
        ("trainable", lambda g: _int(g["trainable"])), ("lr", lambda g: f"{g['lr']:g}"),
        ("test loss", lambda g: _fmt(stats(g[LOSS])) + _failed(g)),
        ("test ppl", lambda g: _fmt(stats(g["test_perplexity"]), ".2f")),
        ("ROUGE-L", lambda g: _fmt(stats(g[ROUGE]), ".2f")), ("BLEU", lambda g: _fmt(stats(g["bleu"]), ".2f")),
        ("train s / run", lambda g: _mean(g["train_wall_seconds"])),
        ("eval s / run", lambda g: _mean(g["eval_seconds"]))])


def _cls_table(groups: dict) -> list[str]:
    return _table(groups, ["cls-full", "cls-lora-r8", "cls-rosa-r8"], [
        ("trainable", lambda g: _int(g["trainable"])), ("lr", lambda g: "trainer default"),
        ("test accuracy", lambda g: _fmt(stats(g["accuracy_final"]), ".4f") + _failed(g)),
        ("test macro-F1", lambda g: _fmt(stats(g["macro_f1_final"]), ".4f")),
        ("train s / run", lambda g: _mean(g["train_wall_seconds"]))])


def _int(x: Optional[int]) -> str:
    return "–" if x is None else f"{x:,}"


def _failed(g: dict) -> str:
    return f" ({g['failed']} seed(s) diverged or failed, left out)" if g["failed"] else ""


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):.0f}" if values else "–"


def _run_table(data: dict) -> list[str]:
    lines = ["| run | sitting | started (UTC) | rc | train s | eval s | val loss | test loss | ROUGE-L | BLEU | "
             "accuracy |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".3f"):
        return "–" if x is None else f"{x:{spec}}"

    for r in sorted(data["runs"].values(), key=lambda r: r["started"]):
        lines.append(f"| {r['name']} | {r.get('sitting', '–')} | {r['started'][:16]} | {r['returncode']} | "
                     f"{f(r.get('train_wall_seconds'), '.0f')} | {f(r.get('eval_seconds'), '.0f')} | "
                     f"{f(r.get('val_loss') if r['task'] == 'lm' else None)} | "
                     f"{f(r.get('test_loss'))} | {f(r.get('rouge_l'), '.2f')} | {f(r.get('bleu'), '.2f')} | "
                     f"{f(r.get('accuracy_final'), '.4f')} |")
    return lines


def _commands(data: dict, scale) -> list[str]:
    """How each run was launched: the trainer with the run's flags (in the JSON), then the scorer."""
    example = next(iter(sorted(data["runs"].values(), key=lambda r: r["started"])), None)
    lines = ["## Commands", "",
             f"Each run: `deepspeed --num_gpus {scale.nproc} launch/train.py --deepspeed ds_configs/zero2.json "
             "FLAGS --output-dir RUN` (FLAGS: the run's `flags` in the JSON), then, for the causal LM, "
             "`python -m bench.study_eval --model RUN/final_model --split-dir SPLITS --out RUN/study_eval.json` "
             "(test loss, greedy headlines, ROUGE-L, BLEU; the validation loss is the trainer's last evaluation). "
             "The exported weights and checkpoints are deleted after scoring; metrics stay in RUN."]
    if example:
        lines += ["", f"For example `{example['name']}`: `{' '.join(example.get('flags', []))}`"]
    return lines + [""]


def _full_plan() -> list[str]:
    f, c = SCALES["full"], SCALES["cpu"]
    steps = (2225 - f.val - f.test) // (f.nproc * f.micro_batch)
    return ["## The `--scale full` plan (one 8-GPU node)", "",
            f"`python -m bench.run --suite study --scale full` (results in `bench/results/study_full.*`): the same "
            f"runs and validation / test articles, training on all {2225 - f.val - f.test:,} other articles, "
            f"{f.nproc} ranks × micro batch {f.micro_batch} = {steps} optimizer steps per epoch, {f.epochs} epochs, "
            f"ROSA resampling every {f.resample_every} steps, precision `auto` (bf16). "
            f"Expected time, **an estimate, not measured** (no GPU was available to this study): SmolLM2-135M "
            f"at 32 × 128 tokens per step is well under a second per step on one H100-class node, so a run "
            f"(~{steps * f.epochs} steps) is dominated by start-up, loading and scoring: about 2–3 minutes, "
            f"and the ~{len(c.ranks) * 2 * len(c.lrs['rosa']) + len(c.lrs['full'])} grid + ~"
            f"{(2 * len(c.ranks) + 1) * (len(c.seeds) - 1) + 3 * len(c.seeds)} seed and ablation runs take "
            "about 2–3 hours."]


def plot(groups: dict, scale, path: Path) -> bool:
    """Test loss and ROUGE-L vs trainable parameters, per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    panels = ((axes[0], "test loss (lower is better)"), (axes[1], "test ROUGE-L"))
    for (ax, _), key in zip(panels, (LOSS, ROUGE)):
        for method, style in (("rosa", "o-"), ("lora", "s--")):
            pts = [(groups[c]["trainable"], stats(groups[c][key])) for c in (f"lm-{method}-r{R}" for R in scale.ranks)
                   if c in groups and groups[c][key] and groups[c]["trainable"]]
            if pts:
                drawn = True
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], fmt=style,
                            capsize=3, label=f"{'ROSA' if method == 'rosa' else 'LoRA'}, R = {scale.ranks}")
        if "lm-full" in groups and groups["lm-full"][key]:
            m, s, _ = stats(groups["lm-full"][key])
            ax.axhline(m, color="gray", ls=":", label="full fine-tuning")
            ax.axhspan(m - s, m + s, color="gray", alpha=0.15)
    return finish_log_plot(fig, panels, "trainable parameters", path, drawn)


def finish_log_plot(fig, axes_labels, xlabel: str, path: Path, drawn: bool) -> bool:
    """Log-x axes with their labels and legends; the figure saved only if anything was drawn."""
    import matplotlib.pyplot as plt

    for ax, label in axes_labels:
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write(path: Path, scale) -> Path:
    data = json.loads(path.read_text())
    groups = summary(data, scale)
    named = plan(scale, data["runs"])
    done = sum(1 for r in named if r.name in {x["name"] for x in finished_runs(data)})
    sp = data.get("splits", {})
    stem = path.with_suffix("")
    has_plot = plot(groups, scale, stem.parent / f"{stem.name}_rank.png")
    total_s = sum(s.get("wall_seconds", 0) for s in data["sittings"])
    lines = [f"# ROSA vs LoRA: tuned, multi-seed study (scale `{scale.name}`)", "",
             f"Command: `python -m bench.run --suite study{' --scale ' + scale.name if scale.name != 'cpu' else ''}` "
             "(resumable; `--plan` lists what is left). Design and plan: `bench/study.py`, `bench/study_plan.py`; "
             "statistics: `bench/study_report.py`.", "",
             f"**Progress: {done} of the {len(named)} runs named so far are finished** "
             f"({sum(len(s['runs']) for s in data['sittings'])} launches in {len(data['sittings'])} sitting(s), "
             f"{total_s / 3600:.1f} h). Seeds at the chosen rate and the ablations are named once the grids they "
             "depend on are finished.", "",
             "## Sizes", "",
             f"- Causal LM: SmolLM2-135M-Instruct (embedded GGUF, fp32), BBC lead → headline, every projection of "
             f"every block. Train {sp.get('train', {}).get('articles')} / validation "
             f"{sp.get('val', {}).get('articles')} / test {sp.get('test', {}).get('articles')} articles (fixed; "
             f"split seed {sp.get('split_seed')}; the {sp.get('duplicate_groups')} groups of articles sharing a "
             f"lead or a headline are never split), `--seq-len {scale.seq_len}`, {scale.nproc} ranks × micro batch "
             f"{scale.micro_batch}, {scale.epochs} epochs, ROSA resamples every {scale.resample_every} optimizer "
             "steps.",
             f"- Learning rate per method and rank from {', '.join(f'{x:g}' for x in scale.lrs['rosa'])} "
             f"(adapters) and {', '.join(f'{x:g}' for x in scale.lrs['full'])} (full), lowest validation loss at "
             f"seed 0; seeds {', '.join(map(str, scale.seeds))} at that rate scored on the test split.",
             "- Generation: greedy, ≤ 32 new tokens, first line; ROUGE-L F (Lin 2004, as `rouge_score` without "
             "stemming; `bench/textmetrics.py`) and sacreBLEU, on every test article.",
             f"- Classification: MiniLM-L6 on BBC topics, train {sp.get('cls_train', {}).get('articles')} / test "
             f"{sp.get('cls_test', {}).get('articles')} articles, the trainer's classification rates (2e-3 "
             "adapters, 1e-4 full), not tuned here.",
             "- Mean ± sample std over seeds; \"beyond noise\": Welch's two-sided t-test at 95% "
             "(Welch–Satterthwaite degrees of freedom, rounded down).", "",
             *_commands(data, scale), *_full_plan(), "",
             "## Hardware (per sitting)", ""]
    for i, s in enumerate(data["sittings"]):  # the commit: in the hardware record, or beside it in older sittings
        hw = {**s["hardware"], "commit": s["hardware"].get("commit") or s.get("commit", "not recorded")}
        lines.append(f"- sitting {i}: started {s['started']}, {len(s['runs'])} runs, {s['wall_seconds'] / 60:.0f} "
                     f"min: {one_line(hw)}")
    lines += ["", "## Verdicts", "", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in verdicts(groups, scale, complete_configs(data, scale))]
    lines += ["", "*pending*: its runs are not all finished; the evidence so far is shown. *contradicted* is final "
              "as soon as one finished comparison (both configurations' grid and seeds done) goes against the claim "
              "beyond noise, even while other ranks are still to run: no later run can undo it.", "",
              "Caveats of the design: the seed-0 run of each configuration both chose its learning rate (on "
              "validation) and counts as one of its three test seeds (a small optimistic bias, the same for every "
              "method); the ablations run at ROSA r=8's chosen rate, not at rates tuned for themselves, which "
              "favours the default configuration (ROSA r=8) in claims 3 and 4.", "",
              "## Learning-rate selection (validation loss, seed 0)", "", *_lr_table(data, scale), "",
              "## Causal LM, test split (at the chosen rate)", "",
              *_result_table(groups, [f"lm-{m}-r{R}" for R in scale.ranks for m in ("lora", "rosa")] + ["lm-full"]),
              "", "### Ablations (ROSA r=8, at ROSA r=8's chosen rate)", "",
              *_result_table(groups, ["lm-rosa-r8"] + [f"lm-rosa-r8-{v}" for v in ("no-resample", "smallest",
                                                                                     "init-lora")]),
              "", "## Classification (test split)", "", *_cls_table(groups), ""]
    if has_plot:
        lines += [f"![test metrics vs trainable parameters]({stem.name}_rank.png)", ""]
    lines += ["## Every run", "", *_run_table(data), ""]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines))
    return md
