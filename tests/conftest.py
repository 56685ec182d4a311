import os
import sys
from pathlib import Path

import pytest
import torch

# the repository root, so that `tests.helpers` imports however pytest is started
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def rel():
    return rel_err


@pytest.fixture(autouse=True)
def unrendered_field_names():
    """Every test starts with errors naming config fields as is: the Trainer path sets its words
    for the whole process (``rosa_ds.errors.set_field_words``), which must not leak into the next test."""
    from rosa_ds.errors import field_words

    with field_words(None):
        yield


@pytest.fixture(scope="session")
def cli_assets(tmp_path_factory) -> Path:
    """A tiny Llama model directory (``llama/``) and 64 prompt/target records (``data.jsonl``),
    shared by the CLI-level tests (read-only: a test that damages files copies them first)."""
    from tests.helpers.assets import tiny_causal_run

    return tiny_causal_run(tmp_path_factory.mktemp("cli_assets"))
