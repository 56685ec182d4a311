"""The capacity suite's plan: its scales, its runs, and which are named next from the records so far
(pure: no training, no files). The design is in ``bench/capacity.py``'s docstring.

Run names: ``<arm>-<method>[-r<R>][-<variant>][-n<N>]-lr<lr>-s<seed>``; arms ``a1`` (tuned AdamW,
the capacity check is its full-FT and LoRA blocks), ``a2`` (the paper's protocol), ``mem`` (the
memorization probe), ``growth`` (ΔW rank vs the number of resamples).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench.study_plan import ADAPTER_LRS, FULL_LRS, chosen_lr, extend_grid, finished, selection_loss

IDEA = "rs64-us"  # Q4, our own idea: ROSA every 64 steps with the uniform factor scale
SGD_LRS = (3e-3, 1e-2, 3e-2, 1e-1)  # plain SGD on full FT; the paper's one shared rate is picked from these
# memorizing random codes wants larger steps than continued training: the grids start where the LM grids end
MEM_LRS = {"rosa": (1e-3, 2e-3, 4e-3, 8e-3), "lora": (1e-3, 2e-3, 4e-3, 8e-3), "full": (5e-5, 1e-4, 2e-4, 4e-4)}


@dataclass(frozen=True)
class Scale:
    """Sizes of one scale. ``epoch_equivalents``: ROSA's "every epoch" on one-pass data resamples
    after every 1/E of the run's optimizer steps (E − 1 resamples: the paper's schedule for an
    E-epoch run, which never resamples after the last epoch)."""

    name: str
    train_blocks: int
    val_articles: int
    test_articles: int
    micro_batch: int
    nproc: int
    lrs: dict = field(default_factory=lambda: {"rosa": ADAPTER_LRS, "lora": ADAPTER_LRS, "full": FULL_LRS})
    sgd_lrs: tuple = SGD_LRS
    mem_lrs: dict = field(default_factory=lambda: dict(MEM_LRS))
    grid_seed: int = 0
    test_seeds: tuple = (1, 2, 3)
    arm2_seeds: tuple = (1, 2)
    arm2_ranks: tuple = (8, 32)
    variants: tuple = ("ee", "rs64-rw", "ee-rw", "fixed")
    epoch_equivalents: int = 3
    resample_every: int = 64
    rewarmup_steps: int = 8
    facts_ns: tuple = (250, 500, 1000, 2000)
    facts_grid_n: int = 1000
    facts_epochs: int = 10
    mem_seeds: tuple = (0,)
    growth_every: tuple = (128, 32, 16)
    # the capacity check's pilot pair, run before the rest of the grids: the rates the BBC study chose
    # (bench/results/study.md) for full FT and LoRA r=8, so an hour in it is known whether the gap
    # exists before hours go into a task that is not capacity-bound
    pilot_lrs: tuple = (("full", 5e-5), ("lora", 1e-3))
    grid_extensions: int = 2  # factor-2 steps past a grid edge that holds the best rate (bench.study_plan)
    timeout_s: int = 7200
    results_stem: str = "capacity"
    corpus: str = "bbc"  # bench/capacity_data.py: "bbc" article bodies or "sympy" source files
    per_doc: Optional[int] = None  # the most blocks one document gives (None: all)

    @property
    def steps(self) -> int:
        """Optimizer steps of one LM run (one pass, no gradient accumulation)."""
        return self.train_blocks // (self.nproc * self.micro_batch)

    @property
    def epoch_equivalent(self) -> int:
        return max(1, math.ceil(self.steps / self.epoch_equivalents))


SCALES = {
    # 2 CPU ranks x micro batch 4: 2,000 blocks = 250 optimizer steps; epoch-equivalent = 84 steps
    "cpu": Scale("cpu", train_blocks=2000, val_articles=100, test_articles=200, micro_batch=4, nproc=2),
    # one 8-GPU node: 5,000 blocks (the articles not held out give 6,554) = 156 steps of 8 x 4
    "full": Scale("full", train_blocks=5000, val_articles=100, test_articles=200, micro_batch=4, nproc=8,
                  timeout_s=3600, results_stem="capacity_full"),
    # the second candidate for a capacity-bound task (BBC's screen failed: LoRA r=8 ahead of full FT):
    # code, the domain of continued training where published comparisons (Biderman et al. 2024,
    # "LoRA Learns Less and Forgets Less") find full FT furthest ahead of LoRA. The BBC grids' best rates
    # (full FT 2e-4, LoRA 2e-3, at an edge) centre the grids and are the pilot pair; the probe is
    # corpus-independent and runs under "cpu" only
    "cpu-code": Scale("cpu-code", train_blocks=2000, val_articles=50, test_articles=100, micro_batch=4, nproc=2,
                      lrs={"rosa": (5e-4, 1e-3, 2e-3, 4e-3), "lora": (5e-4, 1e-3, 2e-3, 4e-3),
                           "full": (5e-5, 1e-4, 2e-4, 4e-4)},
                      facts_ns=(), facts_grid_n=0, pilot_lrs=(("full", 2e-4), ("lora", 2e-3)),
                      results_stem="capacity_code", corpus="sympy", per_doc=8),
    # the pipeline end to end in minutes: one run of each kind, 4 optimizer steps (DeepSpeed's
    # WarmupDecayLR runs its first two steps at rate 0: with 2 steps nothing would train)
    "smoke": Scale("smoke", train_blocks=32, val_articles=2, test_articles=2, micro_batch=4, nproc=2,
                   lrs={"rosa": (1e-3,), "lora": (1e-3,), "full": (5e-5,)}, sgd_lrs=(1e-2,),
                   mem_lrs={"rosa": (4e-3,), "lora": (4e-3,), "full": (1e-4,)}, test_seeds=(1,),
                   arm2_seeds=(1,), arm2_ranks=(8,), variants=("ee",), epoch_equivalents=2, resample_every=1,
                   rewarmup_steps=1, facts_ns=(8,), facts_grid_n=8, facts_epochs=2, growth_every=(1,),
                   grid_extensions=0, timeout_s=900, results_stem="capacity_smoke"),
}


def variant_flags(scale: Scale, variant: str) -> tuple[str, ...]:
    """ROSA's flags per Arm-1 variant: ``rs64`` every ``resample_every`` steps, ``ee`` every
    epoch-equivalent, ``fixed`` never, ``every<N>`` (growth) every N; then ``-rw`` adds
    ``--rewarmup-steps``, ``-us`` the uniform factor scale (Q4, ``RosaConfig.factor_scale``)."""
    base, *extra = variant.split("-")
    if base == "fixed":
        out = ("--resample-every", "never")
    else:
        every = {"rs64": scale.resample_every, "ee": scale.epoch_equivalent}.get(base)
        out = ("--resample-every", str(every if every is not None else int(base.removeprefix("every"))))
    if "rw" in extra:
        out += ("--rewarmup-steps", str(scale.rewarmup_steps))
    return out + (("--factor-scale", "uniform") if "us" in extra else ())


@dataclass(frozen=True)
class CapacityRun:
    """One training run. ``config`` groups the seeds of one arm, method, rank, variant and N."""

    arm: str  # a1 | a2 | mem | growth
    method: str
    rank: int
    seed: int
    lr: float
    variant: str = ""
    n_facts: int = 0
    phase: str = "grid"  # grid | seeds

    @property
    def task(self) -> str:
        return "facts" if self.arm == "mem" else "lm"

    @property
    def config(self) -> str:
        body = self.method if self.method == "full" else f"{self.method}-r{self.rank}"
        return (f"{self.arm}-{body}" + (f"-{self.variant}" if self.variant else "")
                + (f"-n{self.n_facts}" if self.n_facts else ""))

    @property
    def name(self) -> str:
        return f"{self.config}-lr{self.lr:g}-s{self.seed}"

    def flags(self, scale: Scale, data: Path) -> tuple[str, ...]:
        out = ["--model", "default", "--micro-batch", str(scale.micro_batch), "--max-train-samples", "none",
               "--max-eval-samples", "none", "--num-samples", "0", "--seed", str(self.seed), "--lr", f"{self.lr:g}"]
        if self.task == "facts":
            facts = str(data / f"facts_{self.n_facts}.jsonl")
            out += ["--dataset", facts, "--eval-dataset", facts, "--prompt-field", "prompt", "--target-field",
                    "target", "--seq-len", "32", "--epochs", str(scale.facts_epochs)]
        else:
            out += ["--dataset", str(data / "train.jsonl"), "--eval-dataset", str(data / "val.jsonl"),
                    "--text-field", "text", "--seq-len", "128", "--epochs", "1"]
        if self.arm == "a2":
            out += ["--optim", "sgd"]
            out += {"lora": ["--lora-init", "paper"], "rosa": ["--restart-schedule", *variant_flags(scale, "ee")]
                    }.get(self.method, [])
        elif self.method == "rosa" and self.task == "lm":
            out += variant_flags(scale, self.variant)
        return tuple(out)


def planned_steps(scale: Scale, run: CapacityRun) -> int:
    """Optimizer steps of ``run``: one pass over the LM blocks, or ``facts_epochs`` over N facts."""
    if run.task == "lm":
        return scale.steps
    return run.n_facts // (scale.nproc * scale.micro_batch) * scale.facts_epochs  # a last partial batch is dropped


# ---------------------------------------------------------------- the plan

def block(scale: Scale, make, lrs, records: dict, seeds: tuple) -> tuple[list[CapacityRun], Optional[float]]:
    """A seed-0 grid over ``lrs`` (grown past a best edge), then ``seeds`` at the chosen rate."""
    grid = extend_grid(lrs, lambda lr: make(lr, scale.grid_seed, "grid"), records, scale.grid_extensions)
    lr = chosen_lr(grid, records)
    return grid + ([] if lr is None else [make(lr, s, "seeds") for s in seeds]), lr


def grid_bests(scale: Scale, records: dict) -> dict[str, tuple[float, float, bool]]:
    """{"full": (validation loss, rate, grid finished), "lora": ...}: the best finished run of each
    seed-0 grid of the capacity check (Arm 1's full FT and LoRA r=8); a method with no finished
    grid run is absent."""
    best = {}
    for method, rank in (("full", 0), ("lora", 8)):
        grid = extend_grid(scale.lrs[method], lambda lr, m=method, r=rank: CapacityRun("a1", m, r, scale.grid_seed, lr),
                           records, scale.grid_extensions)
        done = [(selection_loss(records[r.name]), r.lr) for r in grid if finished(records.get(r.name))]
        if done:
            best[method] = (*min(done), chosen_lr(grid, records) is not None)
    return best


def screen(scale: Scale, records: dict) -> Optional[bool]:
    """The capacity check's screen on the seed-0 grids (the decision rule's amendments). False
    (the task cannot show the capacity gap; no test seed is spent on full FT or LoRA) as soon as
    full FT's grid is finished and its best validation loss is not below LoRA r=8's best finished
    run: more LoRA runs can only lower LoRA's best, so the outcome is the one both finished grids
    would give. True once both grids are finished and full FT's best is below LoRA's. Else None."""
    best = grid_bests(scale, records)
    if "full" not in best or "lora" not in best or not best["full"][2]:
        return None
    if best["full"][0] >= best["lora"][0]:
        return False
    return True if best["lora"][2] else None


def arm1(scale: Scale, records: dict) -> tuple[list[CapacityRun], dict]:
    """The full-FT and LoRA r=8 grids first, then (unless the screen failed) their test seeds: the
    capacity check. Then ROSA r=8 every ``resample_every`` steps, the ROSA variants at ROSA's chosen
    rate, and Q4's idea (``rs64-us``: every 64 steps with the uniform factor scale) with its own
    grid: the split changes the step each rate gives, so it is tuned like a method. Returns (runs,
    config -> chosen rate)."""
    runs, rates, seeds = [], {}, []
    passed = screen(scale, records)
    for method, rank, variant in (("full", 0, ""), ("lora", 8, ""), ("rosa", 8, "rs64")):
        part, rates[(method, variant)] = block(
            scale, lambda lr, s, ph, m=method, r=rank, v=variant: CapacityRun("a1", m, r, s, lr, v, phase=ph),
            scale.lrs[method],
            records, scale.test_seeds)
        if method == "rosa":
            runs += seeds + part
        else:  # both grids before either's seeds: the screen needs the two
            runs += [r for r in part if r.phase == "grid"]
            seeds += [r for r in part if r.phase == "seeds" and passed is not False]
    rosa = rates[("rosa", "rs64")]
    if rosa is not None:
        runs += [CapacityRun("a1", "rosa", 8, s, rosa, v, phase="seeds") for v in scale.variants
                 for s in scale.test_seeds]
    part, rates[("rosa", IDEA)] = block(
        scale, lambda lr, s, ph: CapacityRun("a1", "rosa", 8, s, lr, IDEA, phase=ph), scale.lrs["rosa"], records,
        scale.test_seeds)
    return runs + part, rates


def arm2(scale: Scale, records: dict) -> list[CapacityRun]:
    """Plain SGD: full FT's grid picks the one rate every method then uses (paper-init LoRA,
    ROSA with the schedule restarted at each resample), R in ``arm2_ranks``."""
    runs, lr = block(scale, lambda lr, s, ph: CapacityRun("a2", "full", 0, s, lr, phase=ph), scale.sgd_lrs, records,
                     scale.arm2_seeds)
    if lr is not None:
        runs += [CapacityRun("a2", m, r, s, lr, phase="seeds") for r in scale.arm2_ranks for m in ("lora", "rosa")
                 for s in scale.arm2_seeds]
    return runs


def memorization(scale: Scale, records: dict) -> list[CapacityRun]:
    """Per method a seed-0 grid at ``facts_grid_n`` facts (the rate with the lowest loss on the
    facts), then every other N at that rate. ROSA resamples at every epoch boundary. LoRA's and
    ROSA's grids alternate, so the two are compared at equal cost at any point of a sitting."""
    if not scale.facts_ns:
        return []
    grids, rest = {}, []
    for method, rank in (("lora", 8), ("rosa", 8), ("full", 0)):
        grids[method] = extend_grid(scale.mem_lrs[method], lambda lr, m=method, r=rank: CapacityRun(
            "mem", m, r, scale.mem_seeds[0], lr, n_facts=scale.facts_grid_n), records, scale.grid_extensions)
        lr = chosen_lr(grids[method], records)
        if lr is not None:
            rest += [CapacityRun("mem", method, rank, s, lr, n_facts=n, phase="seeds") for n in scale.facts_ns
                     for s in scale.mem_seeds if (n, s) != (scale.facts_grid_n, scale.mem_seeds[0])]
    lora, rosa = grids["lora"], grids["rosa"]
    pairs = [r for i in range(max(len(lora), len(rosa))) for r in lora[i:i + 1] + rosa[i:i + 1]]
    return pairs + grids["full"] + rest


def plan(scale: Scale, records: dict) -> list[CapacityRun]:
    """Every run nameable from what is finished, the decisive ones first: the capacity check and
    Arm 1, Arm 2, the memorization probe (first, once the screen has failed: Q1 is then not
    answerable on this task, and the probe is where capacity binds by construction), then the
    resample-count series (ROSA r=8 at its Arm-1 rate, first test seed, resampling every N in
    ``growth_every``; Arm 1's fixed and every-64 runs at that seed are its 0- and 3-resample
    points). The pilot pair (``Scale.pilot_lrs``) leads."""
    runs, rates = arm1(scale, records)
    pilots = [r for r in runs if r.phase == "grid" and (r.method, r.lr) in scale.pilot_lrs]
    runs = pilots + [r for r in runs if r not in pilots]
    if screen(scale, records) is False:  # Arm 1 cannot answer Q1 here: the probe where capacity binds leads
        runs = memorization(scale, records) + runs + arm2(scale, records)
    else:
        runs += arm2(scale, records) + memorization(scale, records)
    rosa = rates[("rosa", "rs64")]
    if rosa is not None:
        runs += [CapacityRun("growth", "rosa", 8, scale.test_seeds[0], rosa, f"every{n}", phase="seeds")
                 for n in scale.growth_every]
    return nearest_first(runs, records)


def nearest_first(runs: list[CapacityRun], records: dict) -> list[CapacityRun]:
    """Within each config's grid, its unfinished rates nearest (in log) to its best finished one
    first (ties: the lower rate), in the slots the grid already holds: the runs that can move the
    choice come before those that can only confirm it. The choice itself (the whole grid's minimum)
    does not depend on the order."""
    out = list(runs)
    for config in dict.fromkeys(r.config for r in runs):
        grid = [(i, r) for i, r in enumerate(out) if r.config == config and r.phase == "grid"]
        done = [r for _, r in grid if finished(records.get(r.name))]
        slots = [i for i, r in grid if not finished(records.get(r.name))]
        if not done or not slots:
            continue
        best = min(done, key=lambda r: (selection_loss(records[r.name]), r.lr)).lr
        for i, r in zip(slots, sorted((out[i] for i in slots), key=lambda r: (abs(math.log(r.lr / best)), r.lr))):
            out[i] = r
    return out
