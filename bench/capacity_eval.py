"""Score one exported model of the capacity suite and measure its update ΔW (one process).

    python -m bench.capacity_eval --model RUN/final_model --data DATA --out RUN/capacity_eval.json \\
        [--facts N] [--base PRETRAINED_DIR]

LM blocks (default): the mean cross-entropy over every token of the test blocks (``test.jsonl``,
tokenized by the trainer's plain-text pipeline, as ``bench.study_eval`` does for headlines).
Facts (``--facts N``): the scored set is the training set (``facts_N.jsonl``: the probe measures
memorization): the mean target loss, and exact-match recall, the share of facts whose greedy
continuation starts with the right 4-digit number.

``--base``: the pretrained model's plain directory; the spectrum of ΔW = W_export − W_base of every
projection matrix (``rosa_ds.spectrum``: numerical rank at 1% and entropy effective rank, mean
per layer type) is added under ``delta_w``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from bench.study_eval import greedy, headline, load_export, mean_target_loss, split_data
from rosa_ds.spectrum import layer_type, summarize, update_ranks

NUMBER = re.compile(r"\s*(\d+)")


def recalled(generated: str, reference: str) -> bool:
    """The continuation's leading number equals the reference's (" 4821." vs "4821 is ...")."""
    got, want = NUMBER.match(generated), NUMBER.match(reference)
    return bool(got and want and got.group(1) == want.group(1))


def answer_tokens(tokenizer, references: list[str]) -> int:
    """Greedy tokens enough to read every reference's number: its longest tokenization plus one.
    SmolLM2 gives a digit a token and the leading space its own (" 4821." is 6 tokens), so a fixed
    budget of 4 stops at " 482" and no fact can count as recalled."""
    return 1 + max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)


def delta_w(base_dir: Path, model_dir: Path) -> dict:
    """Per layer type rank summary of ΔW over the projection matrices (names ending ``proj.weight``),
    with the mean Frobenius norm of ΔW beside it: a ROSA merge-and-split rounds every entry in fp32,
    a full-rank ΔW of tiny norm that the 1%-relative numerical rank counts in full when the
    trained update is ~0 (a run at rate 0 reads rank ~560 of 576), so a rank means something only
    next to a norm well above that floor."""
    start, end = load_file(str(base_dir / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    ranks = update_ranks(start, end, [n for n in end if n.endswith("proj.weight")])
    out = summarize(ranks)
    for kind, summary in out.items():
        norms = [r.norm for name, r in ranks.items() if layer_type(name) == kind]
        summary["norm"] = sum(norms) / len(norms)
    return out


def score_blocks(model_dir: Path, data: Path) -> dict:
    model, tokenizer, device = load_export(model_dir)
    _, test, _ = split_data(tokenizer, data, 128, text_field="text")
    loss = mean_target_loss(model, test, tokenizer.pad_token_id)
    return {"test_loss": loss, "test_perplexity": math.exp(min(loss, 50)), "test_samples": len(test), "device": device}


def score_facts(model_dir: Path, data: Path, n: int) -> dict:
    model, tokenizer, device = load_export(model_dir)
    name = f"facts_{n}.jsonl"
    _, facts, prompts = split_data(tokenizer, data, 32, files=(name, name))
    budget = answer_tokens(tokenizer, [p.reference for p in prompts])
    new = greedy(model, [p.prompt_ids for p in prompts], tokenizer.pad_token_id, budget, eos_id=tokenizer.eos_token_id)
    hits = [recalled(headline(tokenizer, ids), p.reference) for ids, p in zip(new, prompts)]
    return {"fact_loss": mean_target_loss(model, facts, tokenizer.pad_token_id), "exact_match": sum(hits) / len(hits),
            "facts": len(hits), "answer_tokens": budget, "device": device}


def evaluate(model_dir: Path, data: Path, facts: Optional[int], base: Optional[Path]) -> dict:
    start = time.perf_counter()
    rec = score_facts(model_dir, data, facts) if facts else score_blocks(model_dir, data)
    if base is not None:
        rec["delta_w"] = delta_w(base, model_dir)
    rec["eval_seconds"] = round(time.perf_counter() - start, 1)
    return rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--facts", type=int, default=None, help="score the N-fact memorization probe")
    p.add_argument("--base", type=Path, default=None, help="pretrained model dir: add the ΔW spectrum")
    a = p.parse_args(argv)
    rec = evaluate(a.model, a.data, a.facts, a.base)
    a.out.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
