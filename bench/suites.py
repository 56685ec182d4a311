"""Benchmark suites: which runs, on what, with which shared settings.

Every run of a suite trains the same model on the same data with the same seed, steps and
DeepSpeed config; runs differ only in the method flags. ROSA and PEFT LoRA at equal rank on
the same target layers have exactly the same trainable count, R (m + n) per layer, so rank
matching is count matching (the report checks it within 3%).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    """One training run: a name, its method flags, and the suite-wide flags it adds to."""

    name: str
    method: str  # rosa | lora | full
    rank: int = 0
    flags: tuple[str, ...] = ()
    group: str = "main"  # main | ablation | extra: how the report lays it out

    def args(self) -> list[str]:
        out = ["--method", self.method]
        if self.method != "full":
            out += ["--rank", str(self.rank)]
        return out + list(self.flags)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    flags: tuple[str, ...]
    runs: tuple[Run, ...]
    deepspeed: str = "ds_configs/zero2.json"
    nproc: int = 2
    timeout_s: int = 900
    task: str = "causal_lm"
    notes: tuple[str, ...] = field(default_factory=tuple)


def _lm_runs(ranks: tuple[int, ...], ablation_rank: int) -> tuple[Run, ...]:
    runs = [Run("full", "full")]
    for r in ranks:
        runs.append(Run(f"lora-r{r}", "lora", r))
        runs.append(Run(f"rosa-r{r}", "rosa", r))
    runs.append(Run(f"rosa-r{ablation_rank}-smallest", "rosa", ablation_rank, ("--strategy", "smallest"), "ablation"))
    runs.append(Run(f"rosa-r{ablation_rank}-init-lora", "rosa", ablation_rank, ("--init", "lora"), "ablation"))
    return tuple(runs)


# SmolLM2-135M (embedded GGUF) on BBC lead paragraph -> headline; all 7 projections of every block
# adapted (210 matrices). Sized for <= 30 minutes on a 2-core CPU: 2 ranks x 4 samples per step,
# 3 epochs of 8 steps (one resample after each of the first two epochs), 32 held-out samples
# evaluated at the start and after every epoch.
QUICK = Suite(
    name="quick",
    description="SmolLM2-135M, BBC headlines, 2 CPU ranks, ZeRO-2 fp32, 3 epochs x 8 steps",
    flags=("--model", "default", "--max-train-samples", "64", "--max-eval-samples", "32", "--seq-len", "128",
           "--micro-batch", "4", "--epochs", "3", "--num-samples", "0", "--seed", "0"),
    runs=_lm_runs((2, 8, 32), 8) + (
        # the learning rate is the first suspect when one method trails: both at 4x the default
        Run("lora-r8-lr2e-3", "lora", 8, ("--lr", "2e-3"), "ablation"),
        Run("rosa-r8-lr2e-3", "rosa", 8, ("--lr", "2e-3"), "ablation"),
    ),
)

# The same comparison at a size that means something, for one GPU node (8 ranks, bf16 chosen by
# "auto"): the whole BBC training split, 4 epochs, ranks up to 64.
FULL = Suite(
    name="full",
    description="SmolLM2-135M, BBC headlines (all), GPU ranks, ZeRO-2 auto precision, 4 epochs",
    flags=("--model", "default", "--max-train-samples", "2000", "--max-eval-samples", "200", "--seq-len", "256",
           "--micro-batch", "8", "--epochs", "4", "--num-samples", "0", "--seed", "0"),
    runs=_lm_runs((2, 8, 32, 64), 16) + (
        Run("lora-r8-lr2e-3", "lora", 8, ("--lr", "2e-3"), "ablation"),
        Run("rosa-r8-lr2e-3", "rosa", 8, ("--lr", "2e-3"), "ablation"),
    ),
    nproc=8,
    timeout_s=7200,
)

# bitsandbytes options: ROSA r=8 with 8-bit Adam states, and with a 4-bit / 8-bit frozen base.
QUANT = Suite(
    name="quant",
    description="SmolLM2-135M, BBC headlines, 2 CPU ranks, ZeRO-2 fp32, ROSA r=8: fp32 vs bitsandbytes options",
    flags=QUICK.flags,
    runs=(
        Run("rosa-r8", "rosa", 8),
        Run("rosa-r8-adamw8bit", "rosa", 8, ("--optim", "adamw8bit"), "extra"),
        Run("rosa-r8-nf4-base", "rosa", 8, ("--quantize-base", "nf4"), "extra"),
        Run("rosa-r8-int8-base", "rosa", 8, ("--quantize-base", "int8"), "extra"),
    ),
)

# Sequence classification: packaged MiniLM encoder on BBC 5-way topics; ROSA and LoRA
# at equal rank (equal trainable counts; the new head is fully trainable in every method).
CLS = Suite(
    name="cls",
    description="MiniLM-L6 (22.7M), BBC 5-way topics, 2 CPU ranks, ZeRO-2 fp32",
    flags=("--task", "classification", "--seed", "0"),
    runs=(Run("full", "full"), Run("lora-r8", "lora", 8), Run("rosa-r8", "rosa", 8)),
    task="classification",
)

# Resample cost at the default job's sizes (target: resampling <= 1% of an epoch's wall time at
# the default sizes): the default job itself (256 training articles = 32 steps per epoch, the demo
# cap), the same with torch's SVD instead of the default Gram solver, and the default job over the
# whole BBC training split (2,002 articles = 250 steps per epoch), stopped a few steps into epoch 2,
# after its one resample.
EPOCH = Suite(
    name="epoch",
    description="the default job (SmolLM2-135M, ROSA r=8, 2 CPU ranks, ZeRO-2 fp32): resample share of an epoch",
    flags=("--model", "default", "--num-samples", "0", "--seed", "0"),
    runs=(
        Run("rosa-r8", "rosa", 8),
        Run("rosa-r8-svd", "rosa", 8, ("--solver", "svd"), "extra"),
        Run("rosa-r8-all-articles", "rosa", 8, ("--max-train-samples", "none", "--max-steps", "256"), "extra"),
    ),
    timeout_s=1800,
)

# Follow-ups of the quick suite where ROSA trailed LoRA (r = 32: ROSA's training loss fell much
# faster, its held-out loss rose in epoch 3): is it the learning rate or the resampling?
PROBE = Suite(
    name="probe",
    description="quick-suite settings; ROSA r=32 at half the learning rate, and ROSA without resampling",
    flags=QUICK.flags,
    runs=(
        Run("rosa-r32-lr2.5e-4", "rosa", 32, ("--lr", "2.5e-4"), "ablation"),
        Run("lora-r32-lr2.5e-4", "lora", 32, ("--lr", "2.5e-4"), "ablation"),
        Run("rosa-r32-no-resample", "rosa", 32, ("--resample-every", "never"), "ablation"),
        Run("rosa-r8-no-resample", "rosa", 8, ("--resample-every", "never"), "ablation"),
    ),
)

# Packing (issue 18): the default job (256 BBC lead -> headline samples, --seq-len 128, 2 ranks x 4
# per micro batch, 2 epochs) padded as today and with --pack, then the same as a conversation with
# the model's chat template (--chat), padded and packed. Held-out loss is always taken unpacked.
PACK = Suite(
    name="pack",
    description="the default job (SmolLM2-135M, ROSA r=8, 2 CPU ranks, ZeRO-2 fp32) padded vs --pack, and --chat",
    flags=("--model", "default", "--num-samples", "0", "--seed", "0"),
    runs=(
        Run("padded", "rosa", 8),
        Run("packed", "rosa", 8, ("--pack",)),
        # rows hold ~2.9 samples: one row per rank and micro batch gives ~5.8 samples per step, near
        # the padded job's 8, and twice the packed job's optimizer steps
        Run("packed-mb1", "rosa", 8, ("--pack", "--micro-batch", "1")),
        # a second seed of each (data order, subspaces): the spread the held-out losses are compared against
        Run("padded-s1", "rosa", 8, ("--seed", "1")),
        Run("packed-mb1-s1", "rosa", 8, ("--pack", "--micro-batch", "1", "--seed", "1")),
        Run("chat-padded", "rosa", 8, ("--chat", "--num-samples", "2"), "extra"),
        Run("chat-packed", "rosa", 8, ("--chat", "--pack"), "extra"),
    ),
    timeout_s=1200,
)

SUITES = {s.name: s for s in (QUICK, FULL, QUANT, CLS, PROBE, EPOCH, PACK)}
