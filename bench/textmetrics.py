"""Generation metrics for the study: ROUGE-L (implemented here) and BLEU (sacrebleu).

ROUGE-L of one prediction p against one reference r, as Lin (2004) and Google's ``rouge_score``
(default settings, no stemming) define it: both texts lower-cased and split into runs of
``[a-z0-9]``; with L = |LCS(p, r)| over those tokens, precision P = L / |p|, recall R = L / |r|,
and F = 2PR / (P + R) (0 when L = 0). The corpus score is the mean F over samples, × 100.

BLEU is corpus-level sacreBLEU (13a tokenization, one reference), the score the generation papers
quote; ``None`` where sacrebleu is not installed.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence: O(|a| |b|) time, O(|b|) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] of one prediction against one reference."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    common = lcs_length(p, r) if p and r else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F over samples, × 100."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need one prediction per reference, got {len(predictions)} and {len(references)}")
    return 100.0 * sum(map(rouge_l, predictions, references)) / len(references)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> Optional[float]:
    """sacreBLEU corpus score (0-100), or None without sacrebleu."""
    try:
        import sacrebleu
    except ImportError:
        return None
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
