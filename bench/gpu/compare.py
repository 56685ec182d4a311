"""The pair check's verdict: the two-rank run against the one-rank run and the CPU fp32 reference.

Tolerances are bf16's: one rounding is 2^-9 = 2e-3 relative, a few steps of bf16 training drift
the loss and the weights by a few of those; the first factorization is held to fp32 (the fp32
masters of W_f, A and B must reproduce W_0: 1e-6), the checkpoint round trip to the bit.
"""
from __future__ import annotations

from pathlib import Path

SPLIT_TOL = 1e-6
LOSS_TOL = 2e-2
WEIGHT_TOL = 1e-2
RESAMPLE_TOL = 2e-2  # logits change by W_f's bf16 storage rounding


def mean_losses(results: list[dict]) -> list[float]:
    """Per step, the mean over ranks (each rank's loss is over the same number of tokens)."""
    losses = [r["losses"] + [r["next_loss"]] for r in results]
    return [sum(step) / len(step) for step in zip(*losses)]


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def load_export(directory: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(f).items()})
    return out


def weights_rel(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(b[k].norm() ** 2) for k in b)) ** 0.5


def run_rows(run: dict) -> dict:
    """One run's own checks: resumed bit for bit, the split exact, rank 1 owning layers."""
    results = run["results"]
    owners = results[0]["owners"].values()
    return {"ranks": len(results), "devices": sorted({r["device"] for r in results}),
            "losses": mean_losses(results),
            "split_error_max": max(e for r in results for e in r["split_errors"].values()),
            "layers_owned_by_rank": {str(k): sum(1 for o in owners if o == k) for k in range(len(results))},
            "resumed_bit_for_bit": all(r["resumed_bit_for_bit"] for r in results),
            "resample_logits_rel_change": results[0]["resample_logits_rel_change"],
            "export_shards": len(list(Path(run["export"]).glob("*.safetensors")))}


def pair_verdict(runs: dict) -> dict:
    rows = {name: ({"error": run["error"]} if "error" in run else run_rows(run)) for name, run in runs.items()}
    two = "world2" if "error" not in runs["world2"] else "world2_gloo_fallback"
    if "error" in runs["world2"]:
        rows["nccl_refused"] = runs["world2"]["error"][-1500:]
    needed = [two, "world1", "cpu_fp32"]
    if any(name not in runs or "error" in runs[name] for name in needed):
        return {"ok": False, "rows": rows}
    exports = {name: load_export(runs[name]["export"]) for name in needed}
    rows["compare"] = {
        "loss_world2_vs_world1": rel(rows[two]["losses"], rows["world1"]["losses"]),
        "loss_world2_vs_cpu_fp32": rel(rows[two]["losses"], rows["cpu_fp32"]["losses"]),
        "export_world2_vs_world1": weights_rel(exports[two], exports["world1"]),
        "export_world2_vs_cpu_fp32": weights_rel(exports[two], exports["cpu_fp32"]),
    }
    c = rows["compare"]
    ok = (c["loss_world2_vs_world1"] <= LOSS_TOL and c["loss_world2_vs_cpu_fp32"] <= LOSS_TOL
          and c["export_world2_vs_world1"] <= WEIGHT_TOL and c["export_world2_vs_cpu_fp32"] <= WEIGHT_TOL
          and rows[two]["layers_owned_by_rank"].get("1", 0) > 0
          and all(rows[n]["resumed_bit_for_bit"] and rows[n]["split_error_max"] <= SPLIT_TOL
                  and rows[n]["resample_logits_rel_change"] <= RESAMPLE_TOL and rows[n]["export_shards"] > 1
                  for n in needed)
          and two == "world2")  # the fallback says what NCCL refused; it is not the verdict asked for
    return {"ok": ok, "rows": rows}
