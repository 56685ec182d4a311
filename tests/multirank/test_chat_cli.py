"""End to end on 2 CPU ranks: conversations with --chat-template and --pack through the real launcher."""
import json

import torch

from tests.helpers.launch import ROOT, launch_cli, metrics_records

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def conversations(n=48):
    from tests.helpers.assets import tiny_records

    out = []
    for i, r in enumerate(tiny_records("prompt_target", n)):
        turns = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["target"].strip()}]
        out.append(turns if i % 3 else [{"role": "system", "content": "Copy words."}] + turns * 2)
    return out


def test_chat_packed_run_trains_evaluates_and_exports(tmp_path):
    from transformers import AutoTokenizer

    from rosa_ds.recipe.data import BatchOrder, DataConfig, PackedSplit, check_data, tokenize_data
    from tests.helpers.assets import save_tiny_model_dir

    save_tiny_model_dir(tmp_path / "llama", "llama")
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    data = tmp_path / "talk.jsonl"
    data.write_text("".join(json.dumps({"turns": c}) + "\n" for c in conversations()))
    flags = ["--dataset", str(data), "--messages-field", "turns", "--chat-template", str(tmp_path / "chat.jinja"),
             "--seq-len", "128", "--pack", "--max-eval-samples", "8", "--num-samples", "1"]
    out = tmp_path / "run"
    run = ["--model", str(tmp_path / "llama"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
           "--micro-batch", "2", "--epochs", "3", "--lr", "1e-2", "--warmup", "0", "--rank", "4"]
    proc = launch_cli(run + flags, out)
    assert "packing verified" in proc.stdout + proc.stderr

    # the steps per epoch are those of the packs, built exactly as here (same tokenizer and data)
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    cfg = DataConfig(dataset=str(data), messages_field="turns", chat_template=str(tmp_path / "chat.jinja"),
                     seq_len=128, max_eval_samples=8, cache_dir="")
    tokenized = tokenize_data(check_data(cfg), tok)
    packs = PackedSplit(tokenized.train, 128)
    spe = BatchOrder(len(packs), 2, world_size=2).steps_per_epoch
    assert len(packs) < len(tokenized.train) and spe >= 2
    recs = metrics_records(out)
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, spe, 2 * spe, 3 * spe]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 3 * spe + 1))
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1, evals  # it learned the assistant turns
    # generation prompts are rendered with the template, ending in its generation prompt
    assert evals[-1]["samples"][0]["prompt"].endswith("<s>assistant\n")
    # the exported tokenizer carries the template it was trained with
    exported = AutoTokenizer.from_pretrained(out / "final_model")
    assert exported.chat_template == TEMPLATE
    # and the eval loss of the export on the assistant tokens equals the run's last eval loss
    from transformers import AutoModelForCausalLM

    from rosa_ds.recipe.data import PadCollator

    model = AutoModelForCausalLM.from_pretrained(out / "final_model").eval()
    total = count = 0
    with torch.no_grad():
        for i in range(len(tokenized.eval)):
            batch = PadCollator(tok.pad_token_id)([tokenized.eval[i]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + model(**batch).loss.item() * n, count + n
    assert abs(total / count - evals[-1]["eval_loss"]) <= 1e-4 * evals[-1]["eval_loss"]
