"""What a resample does to a bf16 W_f: re-rounded at every merge, or kept as an fp32 master.

    python bench/bf16_merge.py [--update 1e-3] [--layers 0]     # writes bench/results/bf16_merge.{json,md}

Every adapted matrix of the default model (SmolLM2-135M, ROSA R = 8) is followed through 4
resamples in three ways, with the same learned update of the factors before each (``--update``:
its Frobenius norm relative to ||W||, the scale of one epoch's learning), A and B in fp32 as
DeepSpeed's fp32 masters keep them:

* ``fp32``: W_f stored in fp32 (the reference; what a CPU run does);
* ``bf16``: W_f stored in bf16 and re-rounded at every merge, W_f' = bf16(W_f + A B - A' B');
* ``bf16+master``: W_f stored in bf16 as the rounding of an fp32 master; merges read and write the
  master (``RosaConfig.frozen_master``, the default in bf16).

It also reports the first factorization's split error ||W_f + A B - W_0|| / ||W_0|| in each way,
and as it was when DeepSpeed's fp32 masters of A and B were built from the bf16 modules. After
resamples 1, 2 and 4 it reports, summed over all matrices, the relative error against the
reference of (a) the weight the forward uses, W_f(stored) + A B, and of (b) the merged weight a
resample reads and the export writes (the master where there is one), and the same errors as a
fraction of the update learned so far, ||W - W_ref|| / ||W_ref - W_0||.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from bench.hardware import describe, one_line
from bench.report import save_results

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("fp32", "bf16", "bf16+master")
# the first factorization, also as it was before rosa_ds wrote the exact factors into the masters
# after deepspeed.initialize (DeepSpeed built A's and B's fp32 masters from the bf16 modules)
FIRST_VARIANTS = (*VARIANTS, "bf16+master, A B masters from the bf16 modules (before the fix)")
CHECKPOINTS = (1, 2, 4)


def adapted_weights(limit: int) -> list[tuple[str, torch.Tensor]]:
    from rosa_ds.config import RosaConfig
    from rosa_ds.inject import find_targets
    from rosa_ds.recipe.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("default")
    found = [(n, m.weight.detach().float().clone()) for n, m in find_targets(model, RosaConfig(rank=8))]
    return found[:limit] if limit else found


class Layer:
    """One matrix in one variant: W_f as stored (``stored``), its fp32 master if kept, A, B (fp32)."""

    def __init__(self, variant: str, w_frozen: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        self.variant, self.a, self.b = variant, a.clone(), b.clone()
        self.master = w_frozen.clone() if variant == "bf16+master" else None
        self.store(w_frozen)

    def store(self, w_frozen: torch.Tensor) -> None:
        self.stored = w_frozen.clone() if self.variant == "fp32" else w_frozen.to(torch.bfloat16)

    def frozen(self) -> torch.Tensor:
        """What a merge reads: the master if there is one, else the stored W_f."""
        return self.master if self.master is not None else self.stored.float()

    def forward_weight(self) -> torch.Tensor:
        return self.stored.float() + self.a @ self.b

    def resample(self, config, index: int, layer_index: int) -> None:
        from rosa_ds.factorize import frozen_update, merge_weight, new_factors

        f = new_factors(merge_weight(self.frozen(), self.a, self.b), config, index, layer_index, frozen=False)
        w_f = frozen_update(self.frozen(), self.a, self.b, f.a, f.b)
        if self.master is not None:
            self.master = w_f
        self.store(w_f)
        self.a, self.b = f.a, f.b


def first_factorization_errors(w0: torch.Tensor, f) -> dict:
    """||W_f + A B - W_0|| (absolute, fp64) of the first factorization as a resample reads it
    (W_f's master where one is kept, A and B as their fp32 masters hold them) per variant."""
    exact = f.a.double() @ f.b.double()
    rounded = f.a.bfloat16().double() @ f.b.bfloat16().double()
    w_f, w0 = f.w_frozen.double(), w0.double()
    return {"fp32": float((w_f + exact - w0).norm()),
            "bf16": float((f.w_frozen.bfloat16().double() + exact - w0).norm()),
            "bf16+master": float((w_f + exact - w0).norm()),
            FIRST_VARIANTS[3]: float((w_f + rounded - w0).norm())}


def run(limit: int, size: float) -> dict:
    from rosa_ds.config import RosaConfig
    from rosa_ds.factorize import new_factors

    config = RosaConfig(rank=8, frozen_master=False)
    weights = adapted_weights(limit)
    sums = {c: {v: {"forward": 0.0, "merged": 0.0} for v in VARIANTS} for c in CHECKPOINTS}
    ref_sq = {c: 0.0 for c in CHECKPOINTS}
    learned_sq = {c: 0.0 for c in CHECKPOINTS}
    first = {v: 0.0 for v in FIRST_VARIANTS}
    start = time.perf_counter()
    for i, (_, w0) in enumerate(weights):
        f = new_factors(w0, config, 0, i)
        for v, err in first_factorization_errors(w0, f).items():
            first[v] += err ** 2
        layers = {v: Layer(v, f.w_frozen, f.a, f.b) for v in VARIANTS}
        g = torch.Generator().manual_seed(1000 + i)
        for k in range(1, max(CHECKPOINTS) + 1):
            ref = layers["fp32"]
            da = torch.randn(ref.a.shape, generator=g)
            scale = size * float(w0.norm()) / float((da @ ref.b).norm())
            for layer in layers.values():  # the same learned update for every variant
                layer.a = layer.a + scale * da
            for layer in layers.values():
                layer.resample(config, k, i)
            if k in CHECKPOINTS:
                w_ref = ref.frozen() + ref.a @ ref.b
                ref_sq[k] += float(w_ref.double().norm() ** 2)
                learned_sq[k] += float((w_ref - w0).double().norm() ** 2)
                for v, layer in layers.items():
                    merged = layer.frozen() + layer.a @ layer.b
                    sums[k][v]["forward"] += float((layer.forward_weight() - w_ref).double().norm() ** 2)
                    sums[k][v]["merged"] += float((merged - w_ref).double().norm() ** 2)
    rows = []
    for k in CHECKPOINTS:
        for v in VARIANTS:
            row = {"resamples": k, "variant": v}
            for what in ("forward", "merged"):
                err = sums[k][v][what] ** 0.5
                row[f"{what}_rel_error"] = err / ref_sq[k] ** 0.5
                row[f"{what}_error_vs_learned"] = err / learned_sq[k] ** 0.5
            rows.append(row)
    w0_norm = sum(float(w0.double().norm() ** 2) for _, w0 in weights) ** 0.5
    return {"matrices": len(weights), "update": size, "seconds": round(time.perf_counter() - start, 1),
            "rows": rows, "first_factorization": {v: e ** 0.5 / w0_norm for v, e in first.items()}}


def markdown(result: dict) -> str:
    lines = [f"# bf16 merges: re-rounded W_f vs an fp32 master ({result['matrices']} matrices of SmolLM2-135M, "
             f"R = 8, learned update {result['update']:g} ||W|| per epoch)", "",
             f"Machine: {one_line(result['hardware'])}. Command: "
             f"`python bench/bf16_merge.py --update {result['update']:g}`, {result['seconds']} s, "
             f"commit {result.get('commit', '?')}.", "",
             "Relative error against the fp32 run of the weight the forward uses (W_f as stored + A B) and of the "
             "merged weight resamples read and the export writes; `/ learned` divides by the update learned so far, "
             "||W_ref - W_0||.", "",
             "| resamples | variant | forward: rel. error | forward / learned | merged: rel. error "
             "| merged / learned |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['resamples']} | {r['variant']} | {r['forward_rel_error']:.2e} | "
                     f"{r['forward_error_vs_learned']:.1%} | {r['merged_rel_error']:.2e} | "
                     f"{r['merged_error_vs_learned']:.1%} |")
    lines += ["", "First factorization (before any update): ||W_f + A B - W_0|| / ||W_0|| as a resample and the "
              "export read it (W_f's master where kept, A and B as their fp32 masters hold them), summed over all "
              "matrices.", "", "| variant | rel. error |", "|---|---|"]
    lines += [f"| {v} | {e:.2e} |" for v, e in result["first_factorization"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update", type=float, default=1e-3, help="learned update per epoch, relative to ||W||")
    ap.add_argument("--layers", type=int, default=0, help="only the first N adapted matrices (0 = all)")
    ap.add_argument("--stem", default="bf16_merge", help="name of the result files in bench/results")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    result = {**run(args.layers, args.update), "hardware": describe(), "commit": commit.stdout.strip()}
    save_results(ROOT / "bench" / "results", args.stem, result, markdown(result))


if __name__ == "__main__":
    main()
