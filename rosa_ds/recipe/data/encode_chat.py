"""Conversations -> token ids with the loss on the assistant turns only.

A conversation is rendered with the tokenizer's chat template (or ``--chat-template FILE``) and
tokenized once, without added special tokens (the template writes its own BOS/markers). Labels are
the token ids on the assistant turns (their content and end-of-turn token) and -100 elsewhere:

    input_ids = tok(render(messages))                     # [L], L <= seq_len (the tail is cut)
    labels[i] = input_ids[i] if token i is in an assistant turn else -100

The assistant tokens are located in one of two ways, chosen by the template:
1. generation markers: a template that wraps assistant output in ``{% generation %}`` ...
   ``{% endgeneration %}`` gives the mask itself (``apply_chat_template(...,
   return_assistant_tokens_mask=True)``);
2. prefix rendering (any template): for assistant turn k, ``P_k = render(messages[:k],
   add_generation_prompt=True)`` and ``F_k = render(messages[:k+1])``; the turn is the text
   ``F_k[len(P_k):]`` up to its last non-space character (so the end-of-turn token is in, the
   newline between turns is not). ``F_k`` must start with ``P_k``, else the template rewrites
   earlier turns and the tokens cannot be located (one line says so). Token offsets map the
   character spans to tokens; a token straddling a span's edge is an error, not a guess.

Every sample is verified: the assistant tokens decode to text containing each assistant content,
in order. A sample whose assistant tokens were all cut off by ``seq_len`` is dropped and reported.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ...utils.log import warn_rank0
from .config import DataConfig, DataError
from .encode import IGNORE_INDEX, EvalPrompt, fit_prompt
from .prepare import Example

GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def chat_template(tokenizer, cfg: DataConfig) -> str:
    """The template conversations are rendered with: ``--chat-template FILE``, else the tokenizer's."""
    if cfg.chat_template:
        return Path(cfg.chat_template).expanduser().read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise DataError("the model's tokenizer has no chat template, so conversations cannot be rendered; "
                        "give one with --chat-template FILE (a Jinja template)")
    return template


class ChatEncoder:
    """Encodes conversations with one template; see the module docstring for the maths."""

    def __init__(self, tokenizer, template: str, seq_len: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("conversations need a fast tokenizer (token offsets locate the assistant turns); "
                            "use a model directory with tokenizer.json")
        self.tok, self.template, self.seq_len = tokenizer, template, seq_len
        self.markers = GENERATION_TAG.search(template) is not None

    def render(self, messages: list[dict], loc: str, generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises several types; all mean this record does not render
            raise DataError(f"{loc}: the chat template failed to render this conversation "
                            f"({type(exc).__name__}: {str(exc)[:120]}); fix the record or give --chat-template FILE"
                            ) from None

    def encode(self, ex: Example) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one conversation, full length (not yet cut to seq_len)."""
        messages = ex.values["messages"]
        ids, mask = self._by_markers(messages, ex.loc) if self.markers else self._by_prefixes(messages, ex.loc)
        self._verify(ids, mask, messages, ex.loc)
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]

    def _by_markers(self, messages: list[dict], loc: str) -> tuple[list[int], list[int]]:
        self.render(messages, loc)  # a template error becomes one line naming the record
        out = self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
        return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]

    def assistant_spans(self, messages: list[dict], loc: str) -> tuple[str, list[tuple[int, int]]]:
        """(full rendering, character spans [start, end) of each assistant turn in it)."""
        full = self.render(messages, loc)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], loc, generation_prompt=True) if k else ""
            upto = self.render(messages[:k + 1], loc)
            if not upto.startswith(before) or not full.startswith(upto):
                raise DataError(f"{loc}: the chat template renders assistant turn {k} differently from the "
                                "conversation before it, so its tokens cannot be located; give a template with "
                                "{% generation %} markers (--chat-template FILE)")
            turn = upto[len(before):]
            spans.append((len(before), len(before) + len(turn.rstrip())))
        return full, spans

    def _by_prefixes(self, messages: list[dict], loc: str) -> tuple[list[int], list[int]]:
        full, spans = self.assistant_spans(messages, loc)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask = list(enc["input_ids"]), [0] * len(enc["input_ids"])
        for start, end in spans:
            for i, (a, b) in enumerate(enc["offset_mapping"]):
                if b <= start or a >= end:
                    continue
                if a < start or b > end:
                    raise DataError(f"{loc}: a token crosses the edge of an assistant turn (characters {a}-{b} vs "
                                    f"turn {start}-{end}), so the loss mask would be ambiguous; give a template with "
                                    "{% generation %} markers (--chat-template FILE)")
                mask[i] = 1
        return ids, mask

    def _verify(self, ids: list[int], mask: list[int], messages: list[dict], loc: str) -> None:
        """The masked tokens read back as the assistant contents, in order (nothing lost or misplaced)."""
        text = self.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        at = 0
        for m in messages:
            if m["role"] != "assistant" or not m["content"].strip():
                continue
            found = text.find(m["content"].strip(), at)
            if found < 0:
                raise DataError(f"{loc}: the located assistant tokens do not contain the assistant's text "
                                f"{m['content'][:40]!r}; check the chat template's generation markers "
                                "(--chat-template FILE)")
            at = found + len(m["content"].strip())

    def prompt_ids(self, messages: list[dict], loc: str) -> tuple[str, list[int], str]:
        """(rendered prompt, its ids, reference): the conversation before its last assistant turn,
        with the template's generation prompt, for sample generation at eval."""
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        prompt = self.render(messages[:last], loc, generation_prompt=True) if last else \
            self.render([{"role": "user", "content": ""}], loc, generation_prompt=True)
        return prompt, list(self.tok(prompt, add_special_tokens=False)["input_ids"]), messages[last]["content"]


def encode_chat(tokenizer, examples: list[Example], cfg: DataConfig, template: Optional[str] = None):
    """(input_ids, labels, n_truncated, dropped) of conversations cut to ``cfg.seq_len`` (the tail
    goes); ``dropped``: locations of samples left with no assistant token, which are not kept."""
    enc = ChatEncoder(tokenizer, template or chat_template(tokenizer, cfg), cfg.seq_len)
    all_ids, all_labels, truncated, dropped = [], [], 0, []
    for ex in examples:
        ids, labels = enc.encode(ex)
        truncated += len(ids) > cfg.seq_len
        ids, labels = ids[:cfg.seq_len], labels[:cfg.seq_len]
        if all(x == IGNORE_INDEX for x in labels[1:]):  # the model shifts: label 0 is never a target
            dropped.append(ex.loc)
            continue
        all_ids.append(ids)
        all_labels.append(labels)
    if dropped:
        warn_rank0(f"{len(dropped)} conversation(s) lost all assistant tokens to --seq-len {cfg.seq_len} and are "
                   f"left out (first: {', '.join(dropped[:3])}); raise --seq-len to keep them")
    return all_ids, all_labels, truncated, dropped


def chat_eval_prompts(tokenizer, examples: list[Example], cfg: DataConfig, template: str) -> list[EvalPrompt]:
    """Held-out conversations as generation prompts: the turns before the last assistant turn,
    rendered with the generation prompt, cut from the start so that the prompt's end survives."""
    enc, out = ChatEncoder(tokenizer, template, cfg.seq_len), []
    for ex in examples:
        prompt, ids, reference = enc.prompt_ids(ex.values["messages"], ex.loc)
        room = cfg.seq_len - len(tokenizer(reference, add_special_tokens=False)["input_ids"]) - 1
        out.append(EvalPrompt(prompt, reference, fit_prompt(ids, max(1, room), "keep_end")))
    return out
