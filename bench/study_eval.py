"""Score one exported model of the study on its test split (one process, CPU or GPU).

    python -m bench.study_eval --model RUN/final_model --split-dir SPLITS --out RUN/study_eval.json

The model is the trainer's merged export, loaded as a plain ``AutoModelForCausalLM`` (so the score
is what a user gets, and the export is checked on the way). Splits are the study's fixed JSONL
files (``prompt``, ``target``), tokenized by the trainer's own pipeline (same prompt truncation,
target + EOS), so the loss is the trainer's: the mean cross-entropy over target tokens.

Generation: greedy, the prompts left-padded in batches of similar length (each row's positions
come from its attention mask, so a batched row decodes as it would alone: checked in
``tests/unit/test_study.py``), at most ``--max-new-tokens``; the headline is the first line of
the decoded continuation. Scored with ROUGE-L and BLEU (``bench/textmetrics.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.textmetrics import corpus_bleu, corpus_rouge_l
from rosa_ds.recipe.data import check_data, tokenize_data
from rosa_ds.recipe.data.collate import PadCollator
from rosa_ds.recipe.data.config import DataConfig


def split_data(tokenizer, split_dir: Path, seq_len: int, text_field: str | None = None,
               files: tuple[str, str] = ("val.jsonl", "test.jsonl")):
    """(val split, test split, test prompts) tokenized as the trainer does: val read as the
    "training" file and test as the eval file, so every test prompt is kept for generation.
    The trainer itself scores the validation split (its last evaluation is the run's val loss).
    ``text_field``: plain-text rows (loss on every token) instead of prompt / target."""
    fields = {"text_field": text_field} if text_field else {"prompt_field": "prompt", "target_field": "target"}
    cfg = DataConfig(task="causal_lm", dataset=str(split_dir / files[0]), eval_dataset=str(split_dir / files[1]),
                     seq_len=seq_len, num_samples=10**6, cache_dir="", **fields)
    data = tokenize_data(check_data(cfg), tokenizer)
    return data.train, data.eval, data.eval_prompts


@torch.no_grad()
def mean_target_loss(model, split, pad_id: int, batch: int = 16) -> float:
    """Mean cross-entropy over target tokens, the trainer's eval loss (sum of batch mean x tokens)."""
    collate, total, count = PadCollator(pad_id), 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(split), batch):
        b = collate([split[i] for i in range(start, min(start + batch, len(split)))])
        out = model(**{k: v.to(device) for k, v in b.items()})
        n = int((b["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


@torch.no_grad()
def greedy(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, batch: int = 16,
           eos_id: int | None = None) -> list[list[int]]:
    """Greedy continuations (new tokens only) of ``prompts``, batched by length, left-padded."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             **({"eos_token_id": eos_id} if eos_id is not None else {}))
        for row, i in enumerate(idx):
            out[i] = gen[row, width:].tolist()
    return out


def headline(tokenizer, new_ids: list[int]) -> str:
    """The first line of the decoded continuation (special tokens dropped)."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return text.split("\n", 1)[0].strip()


def load_export(model_dir: Path):
    """(model in eval mode, tokenizer with a pad token, device) of an exported plain model, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval(), tokenizer, device


def evaluate(model_dir: Path, split_dir: Path, seq_len: int = 128, max_new_tokens: int = 32) -> dict:
    start = time.perf_counter()
    model, tokenizer, device = load_export(model_dir)
    _, test, prompts = split_data(tokenizer, split_dir, seq_len)
    # the validation loss is the trainer's last evaluation (same data and loss: 1e-7 apart in fp32 on CPU;
    # at --scale full the trainer's is in its bf16 engine, this one the fp32 export)
    rec = {"test_loss": mean_target_loss(model, test, tokenizer.pad_token_id)}
    # the tokenizer's EOS ends a headline, as in training (target + EOS), whatever generation_config says
    new = greedy(model, [p.prompt_ids for p in prompts], tokenizer.pad_token_id, max_new_tokens,
                 eos_id=tokenizer.eos_token_id)
    preds = [headline(tokenizer, ids) for ids in new]
    refs = [p.reference.strip() for p in prompts]
    rec.update(test_perplexity=math.exp(min(rec["test_loss"], 50)), rouge_l=corpus_rouge_l(preds, refs),
               bleu=corpus_bleu(preds, refs), test_samples=len(test),
               examples=[{"reference": r, "generated": p} for r, p in list(zip(refs, preds))[:5]],
               eval_seconds=round(time.perf_counter() - start, 1), device=device)
    return rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--split-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    rec = evaluate(a.model, a.split_dir, a.seq_len, a.max_new_tokens)
    a.out.write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "examples"}))


if __name__ == "__main__":
    main()
