"""The configs of the GPU verdict's models (built from config on the device: no weights travel)."""
from __future__ import annotations

import json
from pathlib import Path

_LLAMA_7B = json.loads((Path(__file__).resolve().parents[1] / "configs" / "llama-7b.json").read_text())

MODEL_CONFIGS = {
    # the two-rank check: 4 layers, so that with 2 ranks rank 1 owns layers (their SVDs, fp32 masters)
    "tiny-llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                   "vocab_size": 128, "tie_word_embeddings": False},
    # step time, MFU and memory on Llama-7B's shapes at a depth that fits any lent GPU
    "llama-7b-2layer": {**_LLAMA_7B, "num_hidden_layers": 2},
}


def build(name: str, seed: int = 0, dtype=None):
    """A randomly initialised causal LM of config ``name`` (transformers, from config)."""
    import torch
    import transformers as tf

    config = dict(MODEL_CONFIGS[name])
    config_class = tf.AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config_class, **({"dtype": dtype} if dtype else {}))
    return model
