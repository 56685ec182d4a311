"""Turn one run's output directory (metrics.jsonl, memory_report.json) into a benchmark record."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _resident(breakdown: dict, places: tuple[str, ...] = ("device", "host")) -> int:
    from rosa_ds.memory.plan import CATEGORIES

    return sum(breakdown[where].get(c, 0) for where in places for c in CATEGORIES)


def _memory(out: Path) -> dict:
    """Per-rank resident bytes (weights, gradients, masters, optimizer states, buffers), predicted by
    the accountant and measured by its census of the engine's tensors, from memory_report.json."""
    path = out / "memory_report.json"
    if not path.is_file():
        return {}
    rep = json.loads(path.read_text())
    errors = [abs(r["rel_error"]) for r in rep.get("comparison", []) if r.get("rel_error") is not None]
    return {"predicted_bytes_rank0": _resident(rep["predicted"]),
            "predicted_device_bytes_rank0": _resident(rep["predicted"], ("device",)),
            "predicted_host_bytes_rank0": _resident(rep["predicted"], ("host",)),
            "measured_device_bytes_per_rank": [_resident(m, ("device",)) for m in rep.get("measured_all_ranks", [])],
            "measured_bytes_per_rank": [_resident(m) for m in rep.get("measured_all_ranks", [])],
            "max_category_rel_error": max(errors, default=None),
            "trainable": rep.get("n_trainable"), "frozen": rep.get("n_frozen"), "rho": rep.get("rho")}


def collect(out: Path) -> dict:
    """Per-run metrics. Step time = median over optimizer steps, leaving out each epoch's first
    step (data-loader start, first-touch allocations) and steps that ran a step-scheduled
    resample; the epoch's training wall = the sum of its steps' seconds. A resample's share is
    its seconds over the training wall of the epoch it closes (a run cut short by --max-steps
    has a partial last epoch, which must not shrink the denominator)."""
    recs = _read_jsonl(out / "metrics.jsonl")
    steps = [r for r in recs if "step_seconds" in r]
    evals = [r for r in recs if r.get("event") == "eval"]
    resamples = [r for r in recs if r.get("event") == "resample"]
    resampled_at = {r["step"] for r in resamples}
    first_of_epoch, seen = set(), set()
    for r in steps:
        if r["epoch"] not in seen:
            seen.add(r["epoch"])
            first_of_epoch.add(r["step"])
    steady = [r for r in steps if r["step"] not in first_of_epoch and r["step"] not in resampled_at] or steps
    epoch_s: dict[int, float] = {}
    epoch_n: dict[int, int] = {}
    for r in steps:
        epoch_s[r["epoch"]] = epoch_s.get(r["epoch"], 0.0) + r["step_seconds"]
        epoch_n[r["epoch"]] = epoch_n.get(r["epoch"], 0) + 1
    res_s = [r["seconds"] for r in resamples]
    epoch_of = {r["step"]: r["epoch"] for r in steps}
    shares = [r["seconds"] / epoch_s[epoch_of[r["step"]]] for r in resamples
              if r["step"] in epoch_of and epoch_s.get(epoch_of[r["step"]])]
    losses = [e["eval_loss"] for e in evals]
    rec = {
        "steps": len(steps),
        "step_seconds_median": statistics.median(r["step_seconds"] for r in steady) if steady else None,
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
        "epoch_train_seconds": [round(epoch_s[k], 2) for k in sorted(epoch_s)],
        "epoch_steps": [epoch_n[k] for k in sorted(epoch_n)],
        "resamples": len(resamples),
        "resample_seconds": res_s,
        "resample_share_of_epoch": statistics.mean(shares) if shares else None,
        "eval_curve": [{"step": e["step"], "epoch": e["epoch"], "eval_loss": e["eval_loss"],
                        **{k: e[k] for k in ("accuracy", "macro_f1", "mcc") if k in e}} for e in evals],
        "eval_loss_start": losses[0] if losses else None,
        "eval_loss_final": losses[-1] if losses else None,
        "eval_loss_best": min(losses) if losses else None,
        "train_loss_last": steps[-1]["loss"] if steps else None,
        "memory": _memory(out),
    }
    if evals and "accuracy" in evals[-1]:
        rec.update({k + "_final": evals[-1][k] for k in ("accuracy", "macro_f1", "mcc") if k in evals[-1]})
    return rec
