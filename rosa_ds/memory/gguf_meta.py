"""Read a GGUF file's metadata (key/values and tensor names) without touching its weights.

transformers' and gguf's readers parse the whole file (tens of seconds, hundreds of MB for the
default model); planning only needs a dozen scalars. Format: GGUF v2/v3 little-endian
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version, tensor count,
kv count, then kv pairs (key string, type u32, value) and tensor infos.
"""
from __future__ import annotations

import struct
from pathlib import Path

from ..errors import ConfigError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# config field prefix -> the GGUF tokenizer key prefix (``tokenizer.ggml.<key>_token_id``)
TOKEN_IDS = (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))


class _Reader:
    def __init__(self, f) -> None:
        self.f = f

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.f.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool = True):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS and not keep:  # skip fixed-size arrays in one seek
                self.f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
                return count
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else count
        raise ConfigError(f"GGUF metadata has unknown value type {vtype}; the file may be corrupt")


def read_gguf_metadata(path: str | Path) -> tuple[dict, list]:
    """(metadata dict, tensor names). Arrays are replaced by their length."""
    with open(path, "rb") as f:
        r = _Reader(f)
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file (bad magic); give a GGUF or a config.json")
        version = r.unpack("<I")
        if version < 2:
            raise ConfigError(f"{path}: GGUF version {version} is too old; re-export it with a current llama.cpp")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        meta = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("<I"), keep=False)
        names = []
        for _ in range(n_tensors):
            names.append(r.string())
            n_dims = r.unpack("<I")
            f.seek(8 * n_dims + 4 + 8, 1)  # dims (u64 each), type (u32), offset (u64)
        return meta, names


def llama_config_from_gguf(path: str | Path):
    """A transformers LlamaConfig from a llama-architecture GGUF's metadata."""
    import transformers as tf

    meta, names = read_gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported by the planner; "
                          "give the model's config.json instead")
    g = lambda key, default=None: meta.get(f"llama.{key}", default)  # noqa: E731
    heads = int(g("attention.head_count"))
    return tf.LlamaConfig(
        vocab_size=int(g("vocab_size", meta.get("tokenizer.ggml.tokens", 32000))),
        hidden_size=int(g("embedding_length")), intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(g("attention.head_count_kv", heads)),
        max_position_embeddings=int(g("context_length", 2048)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        **{f"{name}_token_id": int(meta[f"tokenizer.ggml.{key}_token_id"]) for name, key in TOKEN_IDS
           if f"tokenizer.ggml.{key}_token_id" in meta})
