"""Markdown tables, target checks and PNG plots from bench/results/<suite>.json.

The project's targets are checked here, on the committed numbers, not in timed tests:
  * ROSA step time <= 1.05x LoRA at equal rank; ROSA and LoRA step <= 0.7x full fine-tuning;
  * resampling <= 1% of an epoch's wall time;
  * owner-rank SVD on 2 ranks >= 1.6x faster than every rank doing every layer (bench/micro.py);
  * quality: ROSA's eval loss below LoRA's at equal trainable parameters, improving with rank.
Each is reported as met / NOT met with the numbers; nothing is hidden when a target is missed.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.hardware import one_line

MiB = 2**20


def _fmt(x, spec=".3f", none="–"):
    return none if x is None else format(x, spec)


def _by_name(runs: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in runs if r.get("returncode") == 0}


def _ok(flag: bool) -> str:
    return "met" if flag else "**NOT met**"


def run_table(data: dict) -> list[str]:
    cls = data.get("task") == "classification"
    runs = data["runs"]
    full = _by_name(runs).get("full")
    head = ["run", "trainable", "eval loss start → final (best)"]
    head += ["accuracy", "macro-F1", "MCC"] if cls else ["ppl final"]
    head += ["step s (median)", "tokens/s", "step ÷ full", "resample s (share of epoch)",
             "memory/rank predicted (device + host)", "measured (rank 0, 1)", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        if r.get("returncode") != 0:
            lines.append(f"| {r['name']} | failed ({r.get('returncode')}) |" + " |" * (len(head) - 2))
            continue
        mem = r.get("memory", {})
        meas = mem.get("measured_bytes_per_rank") or []
        step = r.get("step_seconds_median")
        ratio = step / full["step_seconds_median"] if full and step and full.get("step_seconds_median") else None
        res = r.get("resample_seconds") or []
        res_txt = f"{sum(res) / len(res):.1f} ({r['resample_share_of_epoch']:.1%})" if res else "–"
        cells = [r["name"], f"{mem.get('trainable') or 0:,}",
                 f"{_fmt(r.get('eval_loss_start'))} → {_fmt(r.get('eval_loss_final'))} "
                 f"({_fmt(r.get('eval_loss_best'))})"]
        if cls:
            cells += [_fmt(r.get("accuracy_final")), _fmt(r.get("macro_f1_final")), _fmt(r.get("mcc_final"))]
        else:
            import math

            cells.append(_fmt(math.exp(r["eval_loss_final"]) if r.get("eval_loss_final") else None, ".1f"))
        host = mem.get("predicted_host_bytes_rank0") or 0
        pred = _fmt(mem.get("predicted_bytes_rank0") and (mem["predicted_bytes_rank0"] - host) / MiB, ".1f") + \
            (f" + {host / MiB:.1f} host" if host else "") + " MiB"
        meas_dev = mem.get("measured_device_bytes_per_rank") or meas
        meas_txt = ", ".join(f"{d / MiB:.1f}" + (f" + {(t - d) / MiB:.1f}" if t != d else "")
                             for d, t in zip(meas_dev, meas)) + " MiB" if meas else "–"
        cells += [_fmt(step, ".2f"), _fmt(r.get("tokens_per_s_median"), ".0f"), _fmt(ratio, ".2f"), res_txt,
                  pred, meas_txt, f"{r['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(data: dict, micro: dict | None) -> list[str]:
    runs = _by_name(data["runs"])
    out = ["| target | measured | status |", "|---|---|---|"]
    full = runs.get("full")
    ranks = sorted({r["rank"] for r in runs.values() if r["method"] == "rosa" and r["group"] == "main"})
    for r in ranks:
        rosa, lora = runs.get(f"rosa-r{r}"), runs.get(f"lora-r{r}")
        if not (rosa and lora):
            continue
        t_r, t_l = rosa["step_seconds_median"], lora["step_seconds_median"]
        out.append(f"| ROSA step ≤ 1.05× LoRA, r={r} | {t_r:.2f} s vs {t_l:.2f} s = {t_r / t_l:.3f}× | "
                   f"{_ok(t_r / t_l <= 1.05)} |")
        n_r, n_l = rosa["memory"].get("trainable"), lora["memory"].get("trainable")
        if n_r and n_l:
            out.append(f"| trainable counts matched within 3%, r={r} | ROSA {n_r:,} vs LoRA {n_l:,} "
                       f"({abs(n_r - n_l) / n_l:.2%}) | {_ok(abs(n_r - n_l) / n_l <= 0.03)} |")
        if full:
            t_f = full["step_seconds_median"]
            out.append(f"| ROSA and LoRA step ≤ 0.7× full, r={r} | ROSA {t_r / t_f:.2f}×, LoRA {t_l / t_f:.2f}× "
                       f"(full {t_f:.2f} s) | {_ok(max(t_r, t_l) / t_f <= 0.7)} |")
        l_r, l_l = rosa["eval_loss_final"], lora["eval_loss_final"]
        out.append(f"| quality: ROSA eval loss < LoRA, r={r} | ROSA {l_r:.4f} vs LoRA {l_l:.4f} "
                   f"(Δ {l_r - l_l:+.4f}) | {_ok(l_r < l_l)} |")
    for name, r in runs.items():  # one line per resampling run: epoch sizes may differ within a suite
        share = r.get("resample_share_of_epoch")
        if share is None:
            continue
        mean_res, step_s = sum(r["resample_seconds"]) / len(r["resample_seconds"]), r["step_seconds_median"]
        epochs, steps = r.get("epoch_train_seconds") or [0], r.get("epoch_steps") or []
        size = f"{epochs[0]:.0f} s" + (f", {steps[0]}-step" if steps else "")
        out.append(f"| resampling ≤ 1% of an epoch, {name} | {mean_res:.1f} s = {share:.1%} of the "
                   f"{size} epoch it closes; ≤ 1% needs epochs of ≥ "
                   f"{mean_res / (0.01 * step_s):,.0f} steps at {step_s:.2f} s/step | {_ok(share <= 0.01)} |")
    if len(ranks) >= 2:
        for m in ("rosa", "lora"):
            pts = [(r, runs[f"{m}-r{r}"]["eval_loss_final"]) for r in ranks if f"{m}-r{r}" in runs]
            if len(pts) >= 2:
                steady = all(b[1] < a[1] for a, b in zip(pts, pts[1:]))
                out.append(f"| {m.upper()} eval loss by rank | " + " → ".join(f"r={r}: {v:.4f}" for r, v in pts)
                           + f" | {'improves at every rank' if steady else 'not monotone in rank'} |")
    if micro and micro.get("resample"):
        rs = micro["resample"]
        if "owner_2" in rs and "every_2" in rs:
            sp = rs["every_2"]["seconds"] / rs["owner_2"]["seconds"]
            out.append(f"| owner-rank SVD on 2 ranks ≥ 1.6× every-rank | {rs['owner_2']['seconds']:.1f} s vs "
                       f"{rs['every_2']['seconds']:.1f} s = {sp:.2f}× (bench/micro.py) | {_ok(sp >= 1.6)} |")
    return out


def plots(data: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in data["runs"] if r.get("returncode") == 0 and r.get("eval_curve")]
    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs = [e["step"] for e in r["eval_curve"]]
        ys = [e["eval_loss"] for e in r["eval_curve"]]
        style = "-" if r["method"] == "rosa" else "--" if r["method"] == "lora" else ":"
        ax.plot(xs, ys, style, marker="o", ms=3, label=r["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{data['suite']}: eval loss vs step")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(f"{stem}_curves.png", dpi=110)
    plt.close(fig)
    made.append(f"{stem.name}_curves.png")
    main = [r for r in runs if r["method"] in ("rosa", "lora") and r["group"] == "main"]
    if main:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, mark in (("rosa", "o-"), ("lora", "s--")):
            pts = sorted((r["memory"].get("trainable") or 0, r["eval_loss_final"]) for r in main if r["method"] == m)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mark, label=m.upper())
        full = next((r for r in runs if r["method"] == "full"), None)
        if full:
            ax.axhline(full["eval_loss_final"], color="grey", ls=":", label="full FT")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("final held-out loss")
        ax.set_title(f"{data['suite']}: loss vs trainable parameters")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{stem}_params.png", dpi=110)
        plt.close(fig)
        made.append(f"{stem.name}_params.png")
    return made


def save_results(results: Path, stem: str, data: dict, text: str) -> None:
    """``<results>/<stem>.json`` (the numbers) and ``<stem>.md`` (``text``); prints the Markdown.
    ``data["hardware"]`` must be a ``describe()`` record: a results file always names its machine and commit."""
    if "commit" not in data.get("hardware", {}):
        raise ValueError(f"bench: results {stem!r} lack data['hardware'] = bench.hardware.describe() (machine, commit)")
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (results / f"{stem}.md").write_text(text)
    print(text)


def write(path: Path) -> Path:
    data = json.loads(Path(path).read_text())
    micro_path = Path(path).with_name("micro.json")
    micro = json.loads(micro_path.read_text()) if micro_path.is_file() else None
    stem = Path(path).with_suffix("")
    images = plots(data, stem)
    md = [f"# Benchmark suite `{data['suite']}`", "",
          f"{data['description']}.", "",
          f"Hardware: {one_line(data['hardware'])}.", "",
          f"Command: `python -m bench.run --suite {data['suite']}` (started {data['started']}, "
          f"{data.get('suite_wall_seconds', 0) / 60:.1f} min for all runs). Shared flags: "
          f"`{' '.join(data['flags'])}`, DeepSpeed `{data['deepspeed']}`, {data['nproc']} ranks.", "",
          "All runs: same model, data, seed, steps and DeepSpeed config, run one after another in one "
          "invocation; ratios compare runs of this table only. Step time = median optimizer step, "
          "leaving out each epoch's first step. Memory = per-rank resident bytes of weights, "
          "gradients, fp32 masters, optimizer states and buffers, predicted by rosa_ds.memory and "
          "measured by its census of the engine's tensors.", "",
          "## Runs", "", *run_table(data), ""]
    if data.get("task") != "classification":
        md += ["## Targets", "", *targets(data, micro), ""]
    md += [f"![{name}]({name})" for name in images] + [""]
    notes = Path(path).with_name(f"{data['suite']}_notes.md")  # hand-written analysis, kept across reruns
    if notes.is_file():
        md += [notes.read_text().rstrip(), ""]
    out = stem.with_suffix(".md")
    out.write_text("\n".join(md))
    return out
