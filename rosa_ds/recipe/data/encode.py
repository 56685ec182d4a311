"""Tokenization: examples -> token ids with loss labels, stored compactly in ``TokenizedSplit``.

Causal LM, prompt -> target (one sample, length L <= seq_len):

    input_ids = [prefix] + prompt_ids' + target_ids + [eos]
    labels    = [-100] * (len(prefix) + len(prompt_ids')) + target_ids + [eos]

``prefix`` is what the tokenizer puts before text (a BOS for Llama-style tokenizers, nothing for
GPT-2/SmolLM2); ``prompt_ids'`` is the prompt cut to fit seq_len (the target is never cut). The model
shifts labels itself (position i predicts token i+1), so the loss is exactly on the target tokens
and the EOS that teaches it to stop. Plain text: labels = input_ids. Classification: one class id.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DataError
from .prepare import Example

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss' default ignore_index; transformers uses the same
TEXT_PROMPT_WORDS = 16  # eval prompts for plain text: the first words of a held-out text


class TokenizedSplit(torch.utils.data.Dataset):
    """Samples stored flat: sample i is ``input_ids[offsets[i]:offsets[i+1]]`` (int32 on disk).

    ``labels`` has the same flat layout (causal LM) or holds one class id per sample.
    ``__getitem__`` returns ``{"input_ids": LongTensor[L], "labels": LongTensor[L] | int}``.
    """

    def __init__(self, input_ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, per_token: bool):
        self.input_ids, self.offsets, self.labels, self.per_token = input_ids, offsets, labels, per_token

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list) -> TokenizedSplit:
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
        offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.int32)
        per_token = bool(labels) and isinstance(labels[0], list)
        if per_token:
            lab = torch.tensor([t for x in labels for t in x], dtype=torch.int32)
        else:
            lab = torch.tensor(labels, dtype=torch.int64)
        return cls(flat, offsets, lab, per_token)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        labels = self.labels[s:e].long() if self.per_token else int(self.labels[i])
        return {"input_ids": self.input_ids[s:e].long(), "labels": labels}

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def state(self) -> dict:
        return {"input_ids": self.input_ids, "offsets": self.offsets, "labels": self.labels,
                "per_token": self.per_token}

    @classmethod
    def from_state(cls, st: dict) -> TokenizedSplit:
        return cls(st["input_ids"], st["offsets"], st["labels"], bool(st["per_token"]))


@dataclass
class EvalPrompt:
    """A held-out prompt for sample generation; ``prompt_ids`` are cut exactly as in training."""

    prompt: str
    reference: str
    prompt_ids: list[int]


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer adds before text (e.g. Llama's BOS; BERT's [CLS]); [] for GPT-2/SmolLM2."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def fit_prompt(prompt: list[int], room: int, truncation: str) -> list[int]:
    """Cut ``prompt`` to ``room`` tokens, keeping its end (next to the target) or its start."""
    if len(prompt) <= room:
        return prompt
    return prompt[len(prompt) - room:] if truncation == "keep_end" else prompt[:room]


def encode_prompt_target(tokenizer, examples: list[Example], seq_len: int, truncation: str):
    """(input_ids, labels, n_truncated) for prompt -> target examples; see the module docstring."""
    prefix, eos = special_prefix(tokenizer), _eos(tokenizer)
    prompts = _ids(tokenizer, [e.values["prompt"] for e in examples])
    targets = _ids(tokenizer, [e.values["target"] for e in examples])
    all_ids, all_labels, truncated = [], [], 0
    for ex, p, t in zip(examples, prompts, targets):
        t = list(t) + eos
        room = seq_len - len(prefix) - len(t)
        if room < 1:
            raise DataError(f"{ex.loc}: target is {len(t)} tokens, which leaves no room for the prompt in "
                            f"--seq-len {seq_len}; raise --seq-len or shorten the target")
        truncated += len(p) > room
        p = fit_prompt(list(p), room, truncation)
        all_ids.append(prefix + p + t)
        all_labels.append([IGNORE_INDEX] * (len(prefix) + len(p)) + t)
    return all_ids, all_labels, truncated


def encode_text(tokenizer, examples: list[Example], seq_len: int):
    """(input_ids, labels, n_truncated) for plain LM text: [prefix] + text + [eos], cut to seq_len."""
    prefix, eos = special_prefix(tokenizer), _eos(tokenizer)
    full = [prefix + list(t) + eos for t in _ids(tokenizer, [e.values["text"] for e in examples])]
    ids = [x[:seq_len] for x in full]
    return ids, [list(x) for x in ids], sum(len(x) > seq_len for x in full)


def encode_classification(tokenizer, examples: list[Example], seq_len: int, label_names: list[str]):
    """(input_ids, class ids, n_at_cap): the tokenizer's own special tokens, pairs if given."""
    index = {name: i for i, name in enumerate(label_names)}
    texts = [e.values["text"] for e in examples]
    pairs = [e.values["text_pair"] for e in examples] if examples and "text_pair" in examples[0].values else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=seq_len) if texts else {"input_ids": []}
    ids = [list(x) for x in enc["input_ids"]]
    return ids, [index[e.values["label"]] for e in examples], sum(len(x) >= seq_len for x in ids)


def eval_prompts(tokenizer, examples: list[Example], mode: str, seq_len: int, truncation: str) -> list[EvalPrompt]:
    """Held-out prompts (the first eval examples in the seeded order) for sample generation."""
    if mode == "classification" or not examples:
        return []
    prefix, out = special_prefix(tokenizer), []
    for ex in examples:
        if mode == "prompt_target":
            prompt, reference = ex.values["prompt"], ex.values["target"]
            room = seq_len - len(prefix) - len(_ids(tokenizer, [reference])[0]) - len(_eos(tokenizer))
        else:
            words = ex.values["text"].split()
            prompt = " ".join(words[:TEXT_PROMPT_WORDS])
            reference = " ".join(words[TEXT_PROMPT_WORDS:3 * TEXT_PROMPT_WORDS])
            room = seq_len // 2
        ids = fit_prompt(_ids(tokenizer, [prompt])[0], max(1, room), truncation)
        out.append(EvalPrompt(prompt, reference, prefix + list(ids)))
    return out
