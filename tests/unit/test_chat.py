"""Conversations: assistant-only loss masks checked token by token against an independent
reference, on two chat templates (generation markers / none), multi-turn, truncated; bad input."""
import importlib.util
import json

import pytest

from rosa_ds.recipe.data import DataConfig, DataError, check_data, tokenize_data
from rosa_ds.recipe.data.encode_chat import ChatEncoder
from tests.helpers.assets import tiny_tokenizer

# ChatML-like, no generation markers: the mask comes from rendering prefixes.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A different layout, with generation markers: transformers gives the mask.
MARKED = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}### Assistant:\n"
          "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
          "{% else %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}### Assistant:\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief"},
                {"role": "user", "content": "Copy red cat"},
                {"role": "assistant", "content": "red cat"},
                {"role": "user", "content": "And two dogs"},
                {"role": "assistant", "content": "two dogs, one fox"}]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer("llama")
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return t


def reference(tok, template, messages):
    """(ids, mask) built piece by piece: each piece tokenized alone (pieces end at special tokens or
    before a newline-led word, where the tokenizer splits anyway), mask 1 on assistant pieces."""
    pieces = []
    for m in messages:
        a = m["role"] == "assistant"
        if template == "chatml":
            pieces += [("<|im_start|>", 0), (m["role"] + "\n", 0), (m["content"], a), ("<|im_end|>", a), ("\n", 0)]
        else:
            head = "### Assistant:\n" if a else f"### {m['role']}:\n"
            pieces += [(head, 0), (m["content"], a)] + ([("</s>", 1)] if a else []) + [("\n", 0)]
    if template == "marked":
        pieces.insert(0, ("<s>", 0))
    ids, mask = [], []
    for text, a in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [int(a)] * len(t)
    return ids, mask


def write(path, convs, field="messages"):
    path.write_text("".join(json.dumps({field: c}, ensure_ascii=False) + "\n" for c in convs))
    return str(path)


@pytest.mark.parametrize("name, template", [("chatml", CHATML), ("marked", MARKED)], ids=["chatml", "marked"])
def test_assistant_mask_token_by_token(tmp_path, tok, name, template):
    tpl = tmp_path / f"{name}.jinja"
    tpl.write_text(template)
    assert ChatEncoder(tok, template, 512).markers == (name == "marked")
    convs = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:]]
    path = write(tmp_path / "c.jsonl", convs, field="dialog")
    cfg = DataConfig(dataset=path, messages_field="dialog", chat_template=str(tpl), seq_len=512, eval_fraction=0,
                     cache_dir="")
    data = tokenize_data(check_data(cfg), tok)
    assert data.mode == "chat" and data.stats["train_dropped"] == 0
    got = {tuple(data.train[i]["input_ids"].tolist()): data.train[i]["labels"].tolist() for i in range(3)}
    for conv in convs:
        ids, mask = reference(tok, name, conv)
        assert tuple(ids) in got, (name, tok.decode(ids))
        assert got[tuple(ids)] == [t if m else -100 for t, m in zip(ids, mask)]
    # truncation: the cut keeps the start; the labels are the reference's, cut at the same place
    ids, mask = reference(tok, name, CONVERSATION)
    cut = len(ids) - 4  # inside the second answer: its end-of-turn token is gone
    data = tokenize_data(check_data(cfg.__class__(**{**cfg.to_dict(), "seq_len": cut})), tok)
    got = {tuple(data.train[i]["input_ids"].tolist()): data.train[i]["labels"].tolist() for i in range(3)}
    assert got[tuple(ids[:cut])] == [t if m else -100 for t, m in zip(ids[:cut], mask[:cut])]


def test_truncated_away_assistant_is_reported_and_left_out(tmp_path, tok, caplog):
    long_user = {"role": "user", "content": " ".join(["red green blue"] * 30)}
    convs = [CONVERSATION[1:3]] * 4 + [[long_user, {"role": "assistant", "content": "cat"}]]
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML)
    cfg = DataConfig(dataset=write(tmp_path / "c.jsonl", convs), chat_template=str(tpl), seq_len=40,
                     eval_fraction=0, cache_dir="")
    with caplog.at_level("WARNING"):
        data = tokenize_data(check_data(cfg), tok)
    assert len(data.train) == 4 and data.stats["train_dropped"] == 1
    assert f"{cfg.dataset}:5" in caplog.text and "raise --seq-len" in caplog.text
    cfg = DataConfig(dataset=write(tmp_path / "d.jsonl", convs[-1:] * 3), chat_template=str(tpl), seq_len=40,
                     eval_fraction=0, cache_dir="")
    with pytest.raises(DataError, match=r"every training conversation lost its assistant tokens to --seq-len 40"):
        tokenize_data(check_data(cfg), tok)


def test_eval_prompts_use_the_template_generation_prompt(tmp_path, tok):
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML)
    cfg = DataConfig(dataset=write(tmp_path / "c.jsonl", [CONVERSATION] * 4), chat_template=str(tpl), seq_len=512,
                     eval_fraction=0.5, cache_dir="")
    p = tokenize_data(check_data(cfg), tok).eval_prompts[0]
    assert p.reference == "two dogs, one fox"
    assert tok.decode(p.prompt_ids).endswith("And two dogs<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, fragment", [
    ("hello", "c.jsonl:2: field 'messages' is a str, expected a list of {role, content} messages"),
    ([], "c.jsonl:2: field 'messages' is an empty list"),
    ([{"role": "user"}], "c.jsonl:2: message 0 of 'messages' is not a {role, content} object"),
    ([{"role": "bot", "content": "x"}], "c.jsonl:2: message 0 has unknown role 'bot'; use one of system, user, "
                                        "assistant"),
    ([{"role": "user", "content": "x"}], "c.jsonl:2: conversation has no non-empty assistant turn"),
])
def test_bad_conversations_name_the_record(tmp_path, messages, fragment):
    path = write(tmp_path / "c.jsonl", [CONVERSATION, messages])
    with pytest.raises(DataError) as e:
        check_data(DataConfig(dataset=path))  # "messages" is found without --messages-field
    assert str(e.value).startswith(f"{tmp_path}/{fragment}"), str(e.value)


def test_template_problems_are_one_line(tmp_path, tok):
    path = write(tmp_path / "c.jsonl", [CONVERSATION[1:3]] * 3 + [CONVERSATION])
    failing = tmp_path / "f.jinja"
    failing.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                       "{% endif %}{{ m['content'] }}{% endfor %}")
    raw = check_data(DataConfig(dataset=path, chat_template=str(failing), eval_fraction=0))
    with pytest.raises(DataError, match=r"c.jsonl:4: the chat template failed to render this conversation "
                                        r"\(.*no system\); fix the record or give --chat-template FILE"):
        tokenize_data(raw, tok)
    rewrites = tmp_path / "r.jinja"  # drops earlier answers: a prefix no longer renders as a prefix
    rewrites.write_text("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}"
                        "{% endif %}{% endfor %}")
    raw = check_data(DataConfig(dataset=path, chat_template=str(rewrites), eval_fraction=0, cache_dir=""))
    with pytest.raises(DataError, match=r"c.jsonl:4: the chat template renders assistant turn 2 differently"):
        tokenize_data(raw, tok)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "target": "b"}\n' * 3)
    with pytest.raises(DataError, match=r"--chat-template applies to conversations, but .*p.jsonl is read as "
                                        r"prompt_target records; set --messages-field FIELD"):
        check_data(DataConfig(dataset=str(prompts), chat_template=str(rewrites)))
    assert tok.chat_template is None
    with pytest.raises(DataError, match=r"tokenizer has no chat template.*give one with --chat-template FILE"):
        tokenize_data(check_data(DataConfig(dataset=path, cache_dir="")), tok)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"dataset": __file__.replace(".py", ".jsonl"), "chat": True}, "--chat renders the built-in bbc-headlines as "
                                                                   "conversations, but --dataset is"),
    ({"chat": True, "messages_field": "m"}, "--chat (built-in bbc-headlines) and --messages-field (your data) "
                                            "exclude each other"),
    ({"messages_field": "m", "prompt_field": "p"}, "--messages-field (conversations) cannot be combined"),
    ({"chat_template": "missing.jinja", "chat": True}, "--chat-template 'missing.jinja' does not exist"),
    ({"task": "classification", "pack": True}, "DataConfig.pack applies to --task causal_lm only"),
])
def test_chat_flag_errors(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs)
    assert fragment in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="chatterbot-corpus not installed (requirements-assets.txt)")
def test_builtin_chatterbot_conversations(tmp_path, tok):
    raw = check_data(DataConfig(dataset="chatterbot", eval_fraction=0))
    assert len(raw.train) == 2026 and raw.fields.mode == "chat"
    for ex in raw.train:
        roles = [m["role"] for m in ex.values["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2), ex.loc
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML)
    data = tokenize_data(check_data(DataConfig(dataset="chatterbot", chat_template=str(tpl), max_train_samples=64,
                                               cache_dir="")), tok)
    assert len(data.train) == 64 and data.eval_prompts[0].reference
