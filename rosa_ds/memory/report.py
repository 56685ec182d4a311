"""Compare, tabulate and write memory reports (JSON, Markdown, PNG bar chart)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .plan import CATEGORIES, CATEGORY_HELP, TRANSIENT, MemoryBreakdown, MemoryPlan

TOLERANCE = 0.02  # measured may differ from predicted by at most 2 % per category


@dataclass
class CompareRow:
    category: str
    predicted: int
    measured: int

    @property
    def rel_error(self) -> float:
        if self.predicted == self.measured:
            return 0.0
        return abs(self.measured - self.predicted) / max(self.predicted, self.measured, 1)

    @property
    def ok(self) -> bool:
        return self.rel_error <= TOLERANCE


def compare(predicted: MemoryBreakdown, measured: MemoryBreakdown) -> list[CompareRow]:
    """One row per resident category (device + host) plus a total row."""
    rows = [CompareRow(c, predicted.total(c), measured.total(c)) for c in CATEGORIES]
    rows.append(CompareRow("total", predicted.resident(), measured.resident()))
    return rows


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} B"


def compare_markdown(rows: list[CompareRow]) -> str:
    out = ["| category | predicted (B) | measured (B) | rel. error | ok |", "|---|---:|---:|---:|:-:|"]
    out += [f"| {r.category} | {r.predicted:,} | {r.measured:,} | {100 * r.rel_error:.2f}% | "
            f"{'yes' if r.ok else 'NO'} |" for r in rows]
    return "\n".join(out)


def breakdown_markdown(breakdowns: dict, full_key: Optional[str] = "full") -> str:
    """Side-by-side per-category table of several breakdowns (e.g. full / lora / rosa)."""
    names = list(breakdowns)
    out = ["| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c in CATEGORIES + TRANSIENT:
        vals = [breakdowns[n].device[c] + breakdowns[n].host[c] for n in names]
        if any(vals):
            out.append(f"| {c} | " + " | ".join(fmt_bytes(v) for v in vals) + " |")
    for label, fn in (("resident (device)", lambda b: b.resident("device")),
                      ("resident (host)", lambda b: b.resident("host")),
                      ("parameter-related (all)", lambda b: b.state_bytes()),
                      ("peak estimate (device)", lambda b: b.peak_estimate())):
        out.append(f"| **{label}** | " + " | ".join(fmt_bytes(fn(breakdowns[n])) for n in names) + " |")
    if full_key in breakdowns:
        base = breakdowns[full_key].state_bytes()
        out.append("| **reduction vs full** | " + " | ".join(
            f"{base / max(breakdowns[n].state_bytes(), 1):.2f}x" for n in names) + " |")
    return "\n".join(out)


def legend_markdown() -> str:
    return "\n".join(f"- `{c}`: {CATEGORY_HELP[c]}" for c in CATEGORIES + TRANSIENT)


def bar_chart(breakdowns: dict, path: str | Path, title: str = "") -> None:
    """Stacked bars of the device categories (and host, hatched) per method, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(breakdowns)
    cats = [c for c in CATEGORIES + TRANSIENT if any(breakdowns[n].total(c) for n in names)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = [0.0] * len(names)
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(cats):
        for where, hatch in (("device", None), ("host", "//")):
            vals = [getattr(breakdowns[n], where)[c] / 2**30 for n in names]
            if any(vals):
                label = c + (" (host)" if where == "host" else "")
                ax.bar(names, vals, bottom=bottom, color=cmap(i), hatch=hatch, label=label, edgecolor="white")
                bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("GiB per rank")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_memory_report(out_dir: str | Path, predicted: MemoryBreakdown, measured: Optional[MemoryBreakdown] = None,
                        plan: Optional[MemoryPlan] = None, extra: Optional[dict] = None) -> dict:
    """Write ``memory_report.json`` and ``memory_report.md`` into ``out_dir``; returns the JSON dict.
    With ``measured`` both files carry the per-category comparison."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"plan": plan.to_dict() if plan else None, "predicted": predicted.to_dict(), **(extra or {})}
    md = ["# Memory report (per rank)", ""]
    if plan:
        md += [f"Plan: `{json.dumps(plan.to_dict())}`", ""]
    if measured is not None:
        rows = compare(predicted, measured)
        data["measured"] = measured.to_dict()
        data["comparison"] = [{"category": r.category, "predicted": r.predicted, "measured": r.measured,
                               "rel_error": r.rel_error, "ok": r.ok} for r in rows]
        md += ["## Predicted vs measured (census of the engine's tensors)", "", compare_markdown(rows), ""]
        if measured.peak_device is not None:
            md += [f"Measured device peak (torch.cuda.max_memory_allocated): {fmt_bytes(measured.peak_device)}; "
                   f"predicted peak estimate {fmt_bytes(predicted.peak_estimate())}", ""]
    else:
        md += ["## Predicted", "", breakdown_markdown({"predicted": predicted}, None), ""]
    act = (extra or {}).get("activations")
    if act:
        recompute = f"plus {fmt_bytes(act['recompute'])} while one layer is recomputed in backward; " \
            if act["recompute"] else ""
        md += ["## Activations of the first micro step (autograd's saved tensors)", "",
               f"Batch {act['micro_batch']} x {act['seq_len']} tokens{', padded' if act['masked'] else ''}"
               f"{', activation checkpointing' if act['checkpointing'] else ''}: measured "
               f"{fmt_bytes(act['measured'])}, predicted {fmt_bytes(act['predicted'])} "
               f"({100 * (act['predicted'] / max(act['measured'], 1) - 1):+.1f} %); {recompute}"
               "the plan's `activations` row is the prediction at the planned sequence length.", ""]
    md += ["## Categories", "", legend_markdown(), ""]
    (out / "memory_report.json").write_text(json.dumps(data, indent=2))
    (out / "memory_report.md").write_text("\n".join(md))
    return data
