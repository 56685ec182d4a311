"""Metrics: the JSONL log, the rank-0 progress bar, and classification scores and predictions."""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..utils.io import atomic_file
from ..utils.log import log_rank0, logger


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only; a no-op sink elsewhere)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_json({"time": round(time.time(), 3), **record}), allow_nan=False) + "\n")


def finite_json(value):
    """``value`` with every non-finite float as null (JSON has no NaN; ``json.dumps`` would write a
    bare ``NaN`` that strict readers reject); the step's record says why with ``skipped``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def rewind(path: Path, step: int) -> int:
    """Cut ``metrics.jsonl`` back to a resumed checkpoint at ``step`` (atomically); returns the
    number of records dropped.

    Kept: everything up to and including the last ``checkpoint`` event of ``step`` (the step's
    own record, its eval and resample come before its save). Without that event (the log of
    another run, or one cut short), everything before the first record of a later step. A line
    that is not JSON (a write cut by a kill) ends the log: it and what follows are dropped, so the
    resumed run's recomputed steps appear once."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    ends = [i for i, r in enumerate(records) if r.get("event") == "checkpoint" and r.get("step") == step]
    if ends:
        keep = ends[-1] + 1
    else:
        keep = next((i for i, r in enumerate(records) if isinstance(r.get("step"), int) and r["step"] > step),
                    len(records))
    if keep == len(lines):
        return 0
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines[:keep]))
    return len(lines) - keep


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


class LineProgress(_NoBar):
    """Progress as whole log lines, for a stderr that is a file or a pipe (a batch job's log): a
    redrawing bar writes carriage returns there, and every other line ends up glued to it. One
    line per ``every`` steps (about 20 in a run) and at the last step."""

    def __init__(self, total: int, initial: int = 0) -> None:
        self.total, self.n, self.postfix, self.pending = total, initial, {}, False
        self.every = max(1, total // 20)
        self.start, self.start_n = time.perf_counter(), initial

    def update(self, n: int = 1) -> None:
        """Count steps; a due line waits for the step's fields (``set_postfix`` follows ``update``)."""
        self.n += n
        self.pending = self.n % self.every == 0 or self.n >= self.total

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs
        self.close()

    def close(self) -> None:
        if self.pending:
            log_rank0(self.line())
            self.pending = False

    def line(self) -> str:
        done = self.n - self.start_n
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - self.n) if done else float("nan")
        fields = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"train {self.n}/{self.total} ({self.n / max(self.total, 1):.0%}) {fields} "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s")


class _TerminalBar:
    """tqdm on a terminal, with the ``rosa_ds`` logger written through ``tqdm.write`` while it is
    drawn, so a log line appears above the bar instead of after its last redraw."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.redirect = logging_redirect_tqdm(loggers=[logger])
        self.redirect.__enter__()
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)

    def close(self) -> None:
        self.bar.close()
        self.redirect.__exit__(None, None, None)


def progress(total: int, initial: int = 0, enabled: bool = True):
    """Rank 0's progress (loss, tokens/s, ETA): a bar on a terminal, whole lines in a log file;
    silent on other ranks."""
    if not enabled:
        return _NoBar()
    if sys.stderr.isatty():
        return _TerminalBar(total, initial)
    return LineProgress(total, initial)


def classification_metrics(preds: list[int], golds: list[int], num_labels: int) -> dict:
    """Accuracy, macro-F1 (mean over classes of 2PR/(P+R), 0 for an empty class) and the
    multi-class Matthews correlation (Gorodkin 2004; CoLA's metric):
        MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2))
    with c correct, s samples, p_k predicted and t_k true counts of class k."""
    s = len(golds)
    if s == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "mcc": float("nan")}
    conf = [[0] * num_labels for _ in range(num_labels)]
    for p, g in zip(preds, golds):
        conf[g][p] += 1
    correct = sum(conf[k][k] for k in range(num_labels))
    t = [sum(conf[k]) for k in range(num_labels)]
    p = [sum(conf[g][k] for g in range(num_labels)) for k in range(num_labels)]
    f1s = []
    for k in range(num_labels):
        prec = conf[k][k] / p[k] if p[k] else 0.0
        rec = conf[k][k] / t[k] if t[k] else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    denom = math.sqrt((s * s - sum(x * x for x in p)) * (s * s - sum(x * x for x in t)))
    mcc = (correct * s - sum(a * b for a, b in zip(p, t))) / denom if denom else 0.0
    return {"accuracy": correct / s, "macro_f1": sum(f1s) / num_labels, "mcc": mcc}


def eval_postfix(rec: Optional[dict]) -> dict:
    """Progress-bar fields of the latest classification eval (nothing before the first one)."""
    if not rec or "accuracy" not in rec:
        return {}
    return {"eval_acc": f"{rec['accuracy']:.3f}", "eval_f1": f"{rec['macro_f1']:.3f}"}


def write_predictions(path: Path, rows: Sequence[tuple[int, list[float]]], gold_ids: Sequence[int],
                      label_names: Sequence[str]) -> None:
    """The latest eval's per-sample predictions, one JSON object per eval sample in split order:
    ``{"index": i, "label": gold name, "pred": predicted name, "logits": [K floats]}``.

    ``rows`` are (eval index, logits) from all ranks in any order; the file is replaced atomically,
    so it always holds one complete evaluation. Logits are fp32 values written as Python floats
    (shortest round-trip repr), so a reloaded model can be compared against them exactly."""
    with atomic_file(Path(path)) as tmp, open(tmp, "w") as f:
        for i, logits in sorted(rows, key=lambda r: r[0]):
            pred = max(range(len(logits)), key=logits.__getitem__)
            f.write(json.dumps({"index": i, "label": label_names[gold_ids[i]], "pred": label_names[pred],
                                "logits": logits}) + "\n")
