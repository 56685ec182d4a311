"""Tiny on-disk models, tokenizers and datasets for end-to-end tests (no network, well under 2 s).

``save_tiny_model_dir`` writes a directory that ``AutoTokenizer.from_pretrained`` and
``AutoModelFor*.from_pretrained`` load offline: a 2-layer model built from a config and a small
tokenizer trained here with the ``tokenizers`` library. The vocabulary is small (384) because the
output layer dominates the cost of tiny models otherwise.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

KINDS = ("llama", "gpt2", "bert-cls")
DATA_KINDS = ("prompt_target", "text", "classification")
VOCAB_SIZE = 384
MAX_POSITIONS = 256
# Words of the synthetic datasets; also fed to the tokenizer trainer so that they become tokens.
WORDS = ("red green blue black white apple pear plum lemon melon cat dog fox owl bee "
         "one two three four five north south east west river hill stone cloud rain").split()
TOPICS = {"sport": "match goal team coach league cup score win player season",
          "tech": "phone chip software internet computer data network robot code screen",
          "politics": "minister vote party election law government debate labour tory policy"}


def _training_text() -> list[str]:
    """Text the tiny tokenizers learn from: the synthetic words plus the first 60 BBC articles."""
    texts = [" ".join(WORDS)] * 20 + [" ".join(v.split()) for v in TOPICS.values()] * 20
    texts += ["Copy: Output: Article: Headline: The the of and to in a is was for on said"] * 20
    try:
        from rosa_ds.recipe.data.sources import bbc_dir

        texts += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(bbc_dir().glob("*/*.txt"))[:60]]
    except Exception:  # corpus not installed: the synthetic text alone still trains a usable BPE
        pass
    return texts


def _byte_bpe(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"] if kind == "llama" else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(), trainer)
    if kind == "llama":  # Llama-style: a BOS before every text, so the data code's prefix path runs
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def tiny_tokenizer(kind: str = "llama"):
    """A fast tokenizer (vocab <= 384) for ``kind``; GPT-2's has no pad token, like the real one."""
    from transformers import PreTrainedTokenizerFast

    if kind == "llama":
        return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(kind), bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")
    if kind == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(kind), bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>")
    if kind == "bert-cls":
        return PreTrainedTokenizerFast(tokenizer_object=_wordpiece(), unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")


def _tiny_model(kind: str, tok, num_labels: int, hidden: int, seed: int):
    """A tiny ``kind`` model whose vocabulary and special tokens are ``tok``'s."""
    from .models import tiny_model

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if kind == "llama":
        return tiny_model("llama", seed, hidden, 2 * hidden, MAX_POSITIONS, len(tok), pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False, **ids)
    if kind == "gpt2":
        return tiny_model("gpt2", seed, hidden, positions=MAX_POSITIONS, vocab=len(tok), **ids)
    return tiny_model("bert-cls", seed, hidden, 2 * hidden, MAX_POSITIONS, len(tok), pad_token_id=tok.pad_token_id,
                      num_labels=num_labels)


def save_tiny_model_dir(path, kind: str = "llama", num_labels: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    """Write a tiny ``kind`` model (2 layers, ``hidden`` wide) and its tokenizer to ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    path = Path(path)
    tok = tiny_tokenizer(kind)
    model = _tiny_model(kind, tok, num_labels, hidden, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_records(kind: str = "prompt_target", n: int = 64, seed: int = 0, classes: int = 3) -> list[dict]:
    """Synthetic, quickly learnable records: copy three words / word sentences / keyword topics.

    Classification: the first ``classes`` topics (sorted), balanced; each text is 3 keywords of its
    topic and 2 filler words, shuffled, so the label is a function of the words present. Keywords
    make up 3/5 of the tokens: a tiny random BERT's [CLS] (which starts as a near-uniform average
    over tokens) then carries the class strongly enough that rank-4 ROSA/LoRA learn it in ~100
    steps of 8 at lr 5e-3 (2 classes: 92-100% held-out accuracy over 8 seeds, each method)."""
    rng = random.Random(seed)
    if kind == "prompt_target":
        out = []
        for _ in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(3))
            out.append({"prompt": f"Copy: {words}\nOutput:", "target": f" {words}"})
        return out
    if kind == "text":
        return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "."} for _ in range(n)]
    if kind == "classification":
        if not 2 <= classes <= len(TOPICS):
            raise ValueError(f"classes must be 2..{len(TOPICS)}, got {classes}")
        labels = sorted(TOPICS)[:classes]
        out = []
        for i in range(n):
            label = labels[i % classes]  # balanced: n // classes or one more of each
            words = [rng.choice(TOPICS[label].split()) for _ in range(3)] + [rng.choice(WORDS) for _ in range(2)]
            rng.shuffle(words)
            out.append({"text": " ".join(words), "label": label})
        return out
    raise ValueError(f"unknown tiny dataset kind {kind!r}; choose one of {', '.join(DATA_KINDS)}")


def write_tiny_dataset(path, kind: str = "prompt_target", n: int = 64, seed: int = 0,
                       records: Optional[list[dict]] = None) -> Path:
    """Write ``records`` (default: ``tiny_records(kind, n, seed)``) as a .jsonl file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = tiny_records(kind, n, seed) if records is None else records
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_causal_run(directory) -> Path:
    """``directory`` with a tiny llama model dir (``llama``) and 64 prompt/target records
    (``data.jsonl``): what a CLI run of the causal-LM recipe needs."""
    directory = Path(directory)
    save_tiny_model_dir(directory / "llama", "llama")
    write_tiny_dataset(directory / "data.jsonl", "prompt_target", n=64)
    return directory


# llama.cpp's GGUF tensor names for the Hugging Face Llama modules (per layer, then the rest)
GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def _gguf_name(key: str) -> str:
    if key in GGUF_NAMES:
        return GGUF_NAMES[key]
    parts = key.split(".")  # model.layers.<i>.<module path>.weight
    return f"blk.{parts[2]}.{GGUF_LAYER_NAMES['.'.join(parts[3:-1])]}.weight"


def write_tiny_gguf(path, seed: int = 0) -> Path:
    """A tiny Llama (fp32 tensors) with the tiny byte-level BPE tokenizer as a GGUF file that
    transformers loads (``gguf_file=``): the default model's format at a test's size, so the
    GGUF -> safetensors conversion path runs in seconds. q/k are written unpermuted (the loaded
    weights differ from the tiny model's; nothing compares them)."""
    import gguf

    tok = tiny_tokenizer("llama")
    model = _tiny_model("llama", tok, 0, 32, seed)
    c, merges = model.config, json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    for key, value in model.state_dict().items():
        w.add_tensor(_gguf_name(key), value.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
