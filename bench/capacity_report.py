"""The capacity suite's report: bench/results/capacity.md, capacity_rank.png, capacity_memorization.png.

Statistics (``bench.paired_stats``): two configurations run at the same seeds are compared by
their per-seed differences, with the paired t-test's exact two-sided p-value (n − 1 df, no floor)
and the exact sign-flip permutation p-value, and the smallest difference the design detects at
80% power given the differences' measured spread. The decision rule is written into the report
(``DECISION_RULE``) before any run, and verdicts follow it mechanically.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from bench.capacity_plan import IDEA, Scale, grid_bests, plan, screen
from bench.hardware import one_line
from bench.paired_stats import min_detectable_effect, paired_t, sign_flip_p
from bench.study_plan import finished, selection_loss
from bench.study_report import _fmt, finish_log_plot, stats

ALPHA = 0.05
CAPACITY_GAP = 0.03  # nats: full FT must beat LoRA r=8 by this much on test for the task to bind capacity
LORA, ROSA, FULL, FIXED = "a1-lora-r8", "a1-rosa-r8-rs64", "a1-full", "a1-rosa-r8-fixed"
OURS = f"a1-rosa-r8-{IDEA}"

DECISION_RULE = f"""Written before any run of this suite; verdicts below apply it mechanically.

- **Unit of evidence**: a configuration's test-split loss (mean cross-entropy over every token of the
  held-out blocks) at its chosen learning rate, for each test seed. Configurations are compared by
  the per-seed differences d_s = a_s − b_s over the seeds both finished (same data order, same seed).
- **Tests**: the paired t-test, two-sided, exact p from Student's t with n − 1 degrees of freedom
  (regularized incomplete beta; no floored df); and the exact sign-flip permutation p over the 2^n
  sign patterns (assumption-free; its floor is 2/2^n, 0.25 for 3 seeds, so with 3 seeds it is a
  robustness check, not the decider). "Beyond noise" = paired-t p < {ALPHA}.
- **Power**: each comparison reports the smallest mean difference the paired t-test at α = {ALPHA}
  detects with 80% power given the measured standard deviation of the differences (non-central t,
  exact df). A "not shown" with a detectable effect above the practical size (0.01 nats) says
  the design could not see an effect of that size, not that there is none.
- **Capacity check first**: the task is capacity-bound if full FT − LoRA r=8 ≤ −{CAPACITY_GAP} nats
  (mean over test seeds) and p < {ALPHA}. If not, Question 1 is "not answerable at this size" and
  the task is enlarged (more training blocks, `train_blocks` in bench/capacity_plan.py) before Arm 1
  counts. *Screen* (amendment of 2026-12-07, written while full FT at 4e-4 ran and before LoRA r=8's
  grid had more than its 1e-3 run; seed-0 validation then: full FT 3.567 / 3.500 / 3.419 / 3.383 /
  3.380 at 1e-5 … 2e-4, LoRA r=8 3.350 at 1e-3): once both seed-0 grids are finished, if full FT's
  best validation loss is not below LoRA r=8's best, the check is "not capacity-bound" on the screen
  and no test seed is spent on either (three full-FT seeds cost ~1.75 CPU-hours here and could only
  confirm a gap in LoRA's favour); the ROSA runs of Arm 1 still run (Q3 and Q4 do not need the gap).
  Second amendment (2026-12-07, full FT's grid finished at best 3.380, LoRA r=8 at 3.315 with
  2.5e-4 and 4e-3 unrun; no verdict changes): the screen fails as soon as full FT's grid is finished
  and its best is not below LoRA's best finished run, since LoRA's remaining runs can only lower
  LoRA's best; once it has failed, the memorization probe (capacity binds by construction) runs
  before the rest of Arm 1.
- **Q1, ROSA > LoRA where capacity binds (Arm 1, tuned AdamW)**: ROSA r=8 resampling every 64
  steps vs LoRA r=8. *shown*: ROSA lower, p < {ALPHA}; *contradicted*: LoRA lower, p < {ALPHA};
  *not shown*: otherwise. The ROSA variants (epoch-equivalent, re-warmup, fixed) are secondary:
  reported against ROSA r=8 at ROSA's rate, no verdict rests on one of them alone (no correction
  for multiple comparisons is made, so a lone p ≈ 0.04 among them is weak).
- **Q2, the paper's pattern under its protocol (Arm 2, SGD, one shared rate)**: *shown* if ROSA is
  lower than paper-init LoRA at R = 8 and at R = 32 with p < {ALPHA} each, and LoRA's R = 32 − R = 8
  difference is not beyond noise (flat in R); *contradicted* if LoRA is lower beyond noise at either
  R; else *not shown*. With 2 seeds (df = 1) only a difference ~13× its spread reaches p < 0.05: the
  minimum detectable effect is printed beside it.
- **Q3, resampling raises the rank of ΔW**: the mean numerical rank (σ > 1% σ_max) over all adapted
  matrices, ROSA r=8 every 64 steps vs without resampling, paired by seed: *shown* if higher with
  p < {ALPHA}; *contradicted* if lower beyond noise; else *not shown*. The resample-count series
  (one seed) is shown as a figure, without a test.
- **Q4, one idea of our own** (this rule written on 2026-12-07, before any Q4 run; the runs above
  it had started): the uniform factor scale (`--factor-scale uniform`: A_i = u_i c, B_i = (s_i/c) v_iᵀ,
  c² the mean drawn s_i, instead of √s_i on both, so the small-s_i directions a random draw
  picks move as fast as an average one), ROSA r=8 every 64 steps, its own rate chosen on validation
  at seed 0, vs ROSA r=8 every 64 steps at ROSA's rate, paired by test seed. *shown*: lower, p < {ALPHA}
  (the option is kept); *contradicted*: higher, p < {ALPHA}; *not shown*: otherwise (the option is
  removed, as it did not win beyond noise). Its difference to LoRA r=8 is reported beside it.
- A verdict is *pending* while any run it rests on is missing."""


# ---------------------------------------------------------------- grouping

def load(path: Path, scale: Scale) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {"scale": scale.name, "sittings": [], "runs": {}, **data}


def groups(data: dict) -> dict[str, dict[int, dict]]:
    """config -> seed -> record of its finished, successful test-seed runs (phase "seeds")."""
    out: dict[str, dict[int, dict]] = {}
    for r in data["runs"].values():
        if r.get("phase") == "seeds" and finished(r) and r.get("returncode") == 0:
            out.setdefault(r["config"], {})[r["seed"]] = r
    return out


def values(g: dict, config: str, key: str) -> dict[int, float]:
    return {s: r[key] for s, r in g.get(config, {}).items() if isinstance(r.get(key), (int, float))}


def mean_rank(rec: dict, key: str = "numerical_rank") -> Optional[float]:
    """Mean over layer types (weighted by matrices) of a ΔW rank measure; None if not measured."""
    dw = rec.get("delta_w") or {}
    total = sum(v["matrices"] for v in dw.values())
    return sum(v[key] * v["matrices"] for v in dw.values()) / total if total else None


def compare(g: dict, a: str, b: str, key: str = "test_loss") -> Optional[dict]:
    """Paired comparison of configs a − b on ``key`` over their common seeds; None below 2 pairs."""
    va, vb = values(g, a, key), values(g, b, key)
    seeds = sorted(set(va) & set(vb))
    res = paired_t([va[s] for s in seeds], [vb[s] for s in seeds])
    if res is None:
        return None
    diffs = [va[s] - vb[s] for s in seeds]
    return {**res, "seeds": seeds, "sign_flip_p": sign_flip_p(diffs), "mde": min_detectable_effect(res["sd"], res["n"])}


def say(c: Optional[dict], a: str, b: str, metric: str = "test loss") -> str:
    if c is None:
        return f"{metric}: {a} − {b}: fewer than 2 paired seeds"
    mde = "–" if c["mde"] is None else f"{c['mde']:.3f}"
    diff = f"{c['diff']:+.4f}".replace("-", "−")
    return (f"{metric}: {a} − {b} = {diff} (sd {c['sd']:.4f}, n = {c['n']}, t = {c['t']:.2f}, df = "
            f"{c['df']}, paired-t p = {c['p']:.4f}, sign-flip p = {c['sign_flip_p']:.3f}, detectable at 80%: "
            f"{mde})")


def verdict(c: Optional[dict], complete: bool, lower_is_claim: bool = True) -> str:
    """shown / contradicted / not shown / pending for a claim "a is lower than b" (or higher)."""
    if not complete or c is None:
        return "pending"
    if c["p"] < ALPHA:
        return "shown" if (c["diff"] < 0) == lower_is_claim else "contradicted"
    return "not shown"


def complete(data: dict, scale: Scale) -> set[str]:
    """Configs whose every named run is finished."""
    state: dict[str, bool] = {}
    for r in plan(scale, data["runs"]):
        state[r.config] = state.get(r.config, True) and finished(data["runs"].get(r.name))
    return {c for c, done in state.items() if done}


def chosen_runs(data: dict, scale: Scale) -> dict[str, dict[int, dict]]:
    """``groups`` plus each memorization grid's run at its chosen rate (the grid N, seed 0), and
    the derived ``dw_numerical_rank`` / ``dw_effective_rank`` of every record that measured ΔW."""
    g = groups(data)
    grids: dict[str, list] = {}
    for r in plan(scale, data["runs"]):
        if r.arm == "mem" and r.phase == "grid":
            grids.setdefault(r.config, []).append(data["runs"].get(r.name))
    for config, recs in grids.items():
        if all(finished(x) for x in recs):
            best = min(recs, key=selection_loss)
            if best.get("returncode") == 0:
                g.setdefault(config, {})[best["seed"]] = best
    for per_seed in g.values():
        for rec in per_seed.values():
            rec["dw_numerical_rank"], rec["dw_effective_rank"] = mean_rank(rec), mean_rank(rec, "effective_rank")
    return g


# ---------------------------------------------------------------- verdicts

def capacity_check(g: dict, done: set[str], data: Optional[dict] = None,
                   scale: Optional[Scale] = None) -> tuple[str, str, Optional[dict]]:
    c = compare(g, FULL, LORA)
    if data is not None and screen(scale, data["runs"]) is False:
        best = grid_bests(scale, data["runs"])
        return "not capacity-bound (screen)", "seed-0 validation loss, best of each grid: " + ", ".join(
            f"{label} {best[m][0]:.3f} at {best[m][1]:g}" + ("" if best[m][2] else " (grid unfinished: more runs can "
                                                               "only lower it)")
            for m, label in (("full", "full FT"), ("lora", "LoRA r=8"))) + "; full FT is not lower, no test seeds", c
    if FULL not in done or LORA not in done or c is None:
        return "pending", say(c, "full FT", "LoRA r=8"), c
    bound = c["diff"] <= -CAPACITY_GAP and c["p"] < ALPHA
    return ("capacity-bound" if bound else "not capacity-bound"), say(c, "full FT", "LoRA r=8"), c


def verdicts(g: dict, done: set[str], scale: Scale, data: Optional[dict] = None) -> list[tuple[str, str, str]]:
    out = []
    cap, _, _ = capacity_check(g, done, data, scale)
    c = compare(g, ROSA, LORA)
    v = verdict(c, {ROSA, LORA} <= done)
    if cap != "capacity-bound":
        v = "pending" if cap == "pending" else "not answerable at this size (task not capacity-bound)"
    extra = "; ".join(say(compare(g, f"a1-rosa-r8-{x}", ROSA), x, "rs64") for x in scale.variants)
    out.append(("Q1. ROSA r=8 beats LoRA r=8 where capacity binds (Arm 1, tuned AdamW)", v,
                say(c, "ROSA", "LoRA") + f". Capacity check: {cap}. Variants vs ROSA every 64: {extra}"))
    pairs = [(compare(g, f"a2-rosa-r{R}", f"a2-lora-r{R}"), {f"a2-rosa-r{R}", f"a2-lora-r{R}"} <= done)
             for R in scale.arm2_ranks]
    flat = compare(g, f"a2-lora-r{max(scale.arm2_ranks)}", f"a2-lora-r{min(scale.arm2_ranks)}")
    parts = [verdict(c2, ok) for c2, ok in pairs]
    v2 = ("pending" if "pending" in parts else "contradicted" if "contradicted" in parts
          else "shown" if all(p == "shown" for p in parts) and (flat is None or flat["p"] >= ALPHA) else "not shown")
    evid = "; ".join(say(c2, f"ROSA r={R}", f"LoRA r={R}") for (c2, _), R in zip(pairs, scale.arm2_ranks))
    out.append(("Q2. The paper's pattern under its protocol (Arm 2: SGD, one rate, paper-init LoRA, restarted "
                "schedule): ROSA far ahead of LoRA, LoRA flat in R", v2,
                evid + "; LoRA flat in R: " + say(flat, "LoRA r=32", "LoRA r=8")))
    c3 = compare(g, ROSA, FIXED, "dw_numerical_rank")
    out.append(("Q3. Resampling raises the rank of ΔW (Arm 1, ROSA r=8 every 64 steps vs never)",
                verdict(c3, {ROSA, FIXED} <= done, lower_is_claim=False), say(c3, "every 64", "never", "ΔW rank")))
    c4 = compare(g, OURS, ROSA)
    out.append(("Q4. Our idea, the uniform factor scale, beats ROSA's √S split (Arm 1, ROSA r=8 every 64)",
                verdict(c4, {OURS, ROSA} <= done), say(c4, "uniform", "√S") + "; against LoRA: "
                + say(compare(g, OURS, LORA), "uniform", "LoRA r=8")))
    return out


# ---------------------------------------------------------------- tables

def _f(x, spec: str = ".3f") -> str:
    return "–" if x is None else f"{x:{spec}}"


def lr_table(data: dict, scale: Scale) -> list[str]:
    """Each grid (seed 0): validation loss per rate (memorization: loss on the facts), the chosen one."""
    grids: dict[str, list] = {}
    for r in plan(scale, data["runs"]):
        if r.phase == "grid":
            grids.setdefault(r.config, []).append(r)
    lines = ["| config | selection loss per learning rate | chosen |", "|---|---|---|"]
    for config, runs in grids.items():
        recs = [data["runs"].get(r.name) for r in runs]
        cells = [f"{r.lr:g}: {_f(rec.get('val_loss')) if finished(rec) else 'todo'}" for r, rec in zip(runs, recs)]
        pick = min(zip(recs, runs), key=lambda x: (selection_loss(x[0]), x[1].lr))[1].lr if all(
            finished(x) for x in recs) else None
        lines.append(f"| {config} | {', '.join(cells)} | {'pending' if pick is None else f'{pick:g}'} |")
    return lines


def result_table(g: dict, configs: list[str], key: str = "test_loss", label: str = "test loss") -> list[str]:
    lines = [f"| config | seeds | lr | {label} | ΔW numerical rank | ΔW effective rank | train s / run |",
             "|---|---|---|---|---|---|---|"]
    for c in configs:
        recs = list(g.get(c, {}).values())
        if not recs:
            lines.append(f"| {c} | todo | | | | | |")
            continue
        col = [r[key] for r in recs if r.get(key) is not None]
        num = [r["dw_numerical_rank"] for r in recs if r.get("dw_numerical_rank") is not None]
        eff = [r["dw_effective_rank"] for r in recs if r.get("dw_effective_rank") is not None]
        secs = [r["train_wall_seconds"] for r in recs if r.get("train_wall_seconds")]
        seeds = ",".join(str(s) for s in sorted(g[c]))
        lines.append(f"| {c} | {seeds} | {recs[0]['lr']:g} | {_fmt(stats(col), '.4f')} | "
                     f"{_fmt(stats(num), '.1f')} | {_fmt(stats(eff), '.1f')} | "
                     f"{_f(statistics.mean(secs) if secs else None, '.0f')} |")
    return lines


def layer_table(g: dict, configs: list[str]) -> list[str]:
    """ΔW per layer type, first seed of each config: numerical / effective rank (of min(m, n)) and
    the mean Frobenius norm (a rank next to a norm near fp32 round-off is noise: bench.capacity_eval)."""
    firsts = {c: g[c][min(g[c])] for c in configs if g.get(c)}
    kinds = sorted({k for r in firsts.values() for k in (r.get("delta_w") or {})})
    if not kinds:
        return ["No ΔW measured yet."]
    lines = ["| layer type | " + " | ".join(firsts) + " |", "|---" * (len(firsts) + 1) + "|"]
    for k in kinds:
        cells = [(lambda d: f"{d['numerical_rank']:.1f} / {d['effective_rank']:.1f} (of {d['size']:.0f}), "
                  f"‖ΔW‖ {d.get('norm', float('nan')):.2g}" if d else "–")((r.get("delta_w") or {}).get(k))
                 for r in firsts.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def run_table(data: dict) -> list[str]:
    lines = ["| run | sitting | started (UTC) | rc | train s | eval s | val loss | test loss | fact loss | "
             "exact match | ΔW rank |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["runs"].values(), key=lambda r: r["started"]):
        lines.append(f"| {r['name']} | {r.get('sitting', '–')} | {r['started'][:16]} | {r['returncode']} | "
                     f"{_f(r.get('train_wall_seconds'), '.0f')} | {_f(r.get('eval_seconds'), '.0f')} | "
                     f"{_f(r.get('val_loss'))} | {_f(r.get('test_loss'))} | {_f(r.get('fact_loss'))} | "
                     f"{_f(r.get('exact_match'), '.3f')} | {_f(mean_rank(r), '.1f')} |")
    notes = [f"- {r['name']}: {r['recovered']}" for r in data["runs"].values() if r.get("recovered")]
    return lines + (["", "Records rebuilt from their run directory:", "", *notes] if notes else [])


def plan_table(data: dict, scale: Scale) -> list[str]:
    lines = ["| # | run | phase | state |", "|---|---|---|---|"]
    for i, r in enumerate(plan(scale, data["runs"]), 1):
        lines.append(f"| {i} | {r.name} | {r.phase} | {'done' if finished(data['runs'].get(r.name)) else 'todo'} |")
    return lines


# ---------------------------------------------------------------- plots

def growth_points(g: dict, scale: Scale) -> list[tuple[int, float, float]]:
    """(effective resamples, ΔW numerical rank, effective rank) of ROSA r=8 at the first test seed:
    fixed (0), every N ((steps − 1) // N: a resample after the final step changes no weight)."""
    seed, pts = scale.test_seeds[0], []
    configs = [(FIXED, None), (ROSA, scale.resample_every)] + [(f"growth-rosa-r8-every{n}", n)
                                                               for n in scale.growth_every]
    for config, every in configs:
        rec = g.get(config, {}).get(seed)
        if rec and rec.get("dw_numerical_rank") is not None:
            pts.append((0 if every is None else (scale.steps - 1) // every, rec["dw_numerical_rank"],
                        rec["dw_effective_rank"]))
    return sorted(pts)


def plot_growth(g: dict, scale: Scale, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = growth_points(g, scale)
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="ROSA r=8: numerical rank (σ > 1% σ₁)")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="ROSA r=8: entropy effective rank")
    for config, style, name in ((LORA, ":", "LoRA r=8"), (FULL, "-.", "full FT")):
        rec = g.get(config, {}).get(scale.test_seeds[0])
        if rec and rec.get("dw_numerical_rank") is not None:
            ax.axhline(rec["dw_numerical_rank"], ls=style, color="gray", label=f"{name}: numerical rank")
    ax.set_xlabel("resamples in the run")
    ax.set_ylabel("rank of ΔW (mean over adapted matrices)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memorization(g: dict, scale: Scale, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for body, style in (("lora-r8", "s--"), ("rosa-r8", "o-"), ("full", "^:")):
        pts = [(n, r) for n in scale.facts_ns for r in g.get(f"mem-{body}-n{n}", {}).values()]
        if not pts:
            continue
        drawn = True
        for ax, key in ((axes[0], "exact_match"), (axes[1], "fact_loss")):
            ax.plot([n for n, _ in pts], [r[key] for _, r in pts], style, label=body)
    return finish_log_plot(fig, ((axes[0], "exact-match recall on the trained facts"), (axes[1], "loss on the facts")),
                           "facts N", path, drawn)


# ---------------------------------------------------------------- the document

DESIGN_NOTES = """- **Epoch-equivalent**: the data is one pass, so ROSA's "every epoch" is every ⌈steps / 3⌉
  optimizer steps (2 resamples: the paper's schedule for a 3-epoch run, which never resamples after
  the last epoch); "every 64 steps" gives 3 at the CPU scale's 250 steps.
- **Re-warmup**: `--rewarmup-steps 8` (the rate ramps over 8 steps after each resample).
- **ΔW's floor**: a ROSA merge-and-split rounds every weight in fp32, a full-rank ΔW of tiny norm;
  the numerical rank counts it in full when the trained update is ~0, so every rank is shown next
  to ‖ΔW‖ (the smoke run at rate 0 read rank ~560 of 576 for q_proj from round-off alone).
- **The rank of ΔW vs resamples**: one finished run per resample count (never, every 128, 64, 32,
  16 steps), not checkpoints inside one run: each point has its own full schedule.
- **Q4, why this idea**: a step of η on the factors moves W along drawn direction i by about
  η(|A_i| + |B_i|), 2η√s_i under ROSA's split, so small-s_i directions move slowly at a rate that
  is safe for the large ones, while LoRA's fixed-norm factors move every direction alike. Measured
  before the runs, the effect to expect is modest: on SmolLM2's 210 matrices the median direction's
  √s_i is 0.97 of √(mean s) (0.63 at the lowest) and 7.6% of the directions (37.5% in the most
  skewed matrix) step under half as fast as an average one. The uniform split keeps A B (the
  model, W_f, the resample) identical and changes only that. It gets its own rate grid because it
  changes what each rate does. Not built: gradient-aligned subspaces (keep the R triplets with the
  largest |u_iᵀ G v_i|, which needs a dense gradient pass inside the engine's resample)."""


def _blocks(splits: dict) -> str:
    parts = [f"{k} {v['blocks']:,} from {v[unit]} {unit}" for k, v in splits.items()
             if isinstance(v, dict) and "blocks" in v for unit in ("articles", "files") if unit in v]
    return ", ".join(parts) or "not written yet"


def _corpus(scale: Scale, splits: dict) -> tuple[str, str]:
    """(what the LM blocks are, what a held-out document is) for the Sizes section."""
    if scale.corpus == "bbc":
        return "BBC article bodies", "articles"
    return (f"the Python source of {splits.get('corpus', scale.corpus)} (tests and benchmarks left out; at most "
            f"{scale.per_doc} evenly spaced blocks per file)", "files")


def write(path: Path, scale: Scale) -> Path:
    data = load(path, scale)
    g, done = chosen_runs(data, scale), complete(data, scale)
    named = plan(scale, data["runs"])
    n_done = sum(finished(data["runs"].get(r.name)) for r in named)
    stem = path.with_suffix("")
    has_growth = plot_growth(g, scale, stem.parent / f"{stem.name}_rank.png")
    has_mem = plot_memorization(g, scale, stem.parent / f"{stem.name}_memorization.png")
    cap, cap_evid, _ = capacity_check(g, done, data, scale)
    sp = data.get("splits", {})
    flag = "" if scale.name == "cpu" else f" --scale {scale.name}"
    corpus, unit = _corpus(scale, sp)
    lines = [f"# Where does ROSA beat LoRA? The capacity suite (scale `{scale.name}`)", "",
             f"Command: `python -m bench.run --suite capacity{flag}` (resumable; `--plan` lists what is left; "
             "design: `bench/capacity.py`, plan: `bench/capacity_plan.py`, data: `bench/capacity_data.py`, "
             "statistics: `bench/paired_stats.py`).", "",
             f"**Progress: {n_done} of the {len(named)} runs named so far are finished** "
             f"({len(data['sittings'])} sitting(s)). Seeds at a chosen rate, the ROSA variants, Arm 2's methods "
             "and the other N of the memorization probe are named once the grids they depend on are finished.", "",
             "## Decision rule", "", DECISION_RULE, "",
             "## Sizes", "",
             f"- LM: SmolLM2-135M-Instruct (embedded GGUF, fp32), every projection of every block; {corpus} "
             f"in {128}-token blocks (127 text tokens + EOS), one pass over {scale.train_blocks:,} training "
             f"blocks = {scale.steps} optimizer steps ({scale.nproc} ranks × micro batch {scale.micro_batch}); "
             f"validation {scale.val_articles} / test {scale.test_articles} {unit} never trained on "
             f"(blocks per split: {_blocks(sp)}).",
             f"- Rates: adapters {', '.join(f'{x:g}' for x in scale.lrs['lora'])}; full FT "
             f"{', '.join(f'{x:g}' for x in scale.lrs['full'])}; SGD (Arm 2) "
             f"{', '.join(f'{x:g}' for x in scale.sgd_lrs)}"
             f"; grids at seed {scale.grid_seed}, test seeds {scale.test_seeds} (Arm 2: {scale.arm2_seeds}).",
             (f"- Memorization: N ∈ {scale.facts_ns}, {scale.facts_epochs} epochs, rate chosen at N = "
              f"{scale.facts_grid_n}." if scale.facts_ns else "- Memorization: run under the `cpu` scale only."), "",
             "## Hardware (per sitting)", ""]
    lines += [f"- sitting {i}: started {s['started']}, {len(s['runs'])} runs, {s['wall_seconds'] / 60:.0f} min: "
              f"{one_line(s['hardware'])}" for i, s in enumerate(data["sittings"])] or ["- no sitting yet"]
    lines += ["", "## Capacity check (first)", "", f"**{cap}**: {cap_evid}", "",
              "## Verdicts", "", "| question | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {q} | **{v}** | {e} |" for q, v, e in verdicts(g, done, scale, data)]
    lines += ["", "## Arm 1: tuned AdamW (test loss, test seeds)", "",
              *result_table(g, [FULL, LORA, ROSA] + [f"a1-rosa-r8-{v}" for v in scale.variants] + [OURS]), "",
              "## Arm 2: the paper's protocol (plain SGD, one shared rate)", "",
              *result_table(g, ["a2-full"] + [f"a2-{m}-r{R}" for R in scale.arm2_ranks for m in ("lora", "rosa")]),
              "", "## ΔW per layer type (numerical / effective rank, first test seed)", "",
              *layer_table(g, [FULL, LORA, ROSA, FIXED]), ""]
    if has_growth:
        lines += ["![rank of ΔW vs resamples](" + f"{stem.name}_rank.png)", ""]
    lines += ["## Memorization probe", "",
              *result_table(g, [f"mem-{b}-n{n}" for b in ("lora-r8", "rosa-r8", "full") for n in scale.facts_ns],
                            "exact_match", "exact match"), ""]
    if has_mem:
        lines += ["![memorization vs N](" + f"{stem.name}_memorization.png)", ""]
    lines += ["## Learning-rate selection (seed 0)", "", *lr_table(data, scale), "",
              "## Design notes", "", DESIGN_NOTES, "", "## The plan so far", "", *plan_table(data, scale), "",
              "## Every run", "", *run_table(data), ""]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines))
    return md

