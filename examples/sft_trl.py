"""ROSA in an ordinary TRL script: SFTTrainer fine-tunes SmolLM2-135M-Instruct on the built-in
chatterbot-corpus conversations, on DeepSpeed.

    deepspeed --num_gpus 2 examples/sft_trl.py --output-dir DIR
    deepspeed --num_gpus 2 examples/sft_trl.py --output-dir DIR --deepspeed ds_configs/zero3.json
    examples/accelerate_zero3.sh DIR            # accelerate launch --use_deepspeed, ZeRO-3

What ROSA changes in an SFTTrainer script is marked ``# ROSA``: ``with_rosa(SFTTrainer)`` and
``peft_config=RosaConfig(...)`` where the script would pass a LoraConfig (a PEFT ``LoraConfig``
there is refused: ROSA replaces the adapter). The merged plain model (``from_pretrained`` loads
it) goes to ``DIR/merged``. Without DeepSpeed: ``python examples/sft_trl.py --output-dir DIR
--deepspeed ''``. ``SFTConfig`` would train in bf16 on a CPU by default; fp32 is asked for here
unless a GPU supports bf16.

The defaults (the first 64 conversations, 128 tokens, 2 epochs of 8 steps, one resample between
them) are meant for a few minutes on 2 CPU ranks; raise ``--max-train-samples`` for a real run.
"""
import argparse

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rosa_ds import RosaConfig
from rosa_ds.hf import adopt_process_group, with_rosa  # ROSA
from rosa_ds.recipe.data.sources import read_source
from rosa_ds.recipe.models import load_model_and_tokenizer
from rosa_ds.schedule import ScheduleConfig
from rosa_ds.utils.dist import exit_now


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="the merged model goes to OUTPUT_DIR/merged")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json",
                   help="DeepSpeed config; '' without DeepSpeed or under accelerate launch (its config is used)")
    p.add_argument("--model", default="default", help="default (SmolLM2-135M-Instruct), a model directory or a .gguf")
    p.add_argument("--rank", type=int, default=8, help="ROSA rank R")
    p.add_argument("--resample-every", default="epoch", help="epoch, never, or N optimizer steps")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-train-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args()


def main() -> int:
    a = parse()
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # the arguments first: under ZeRO-3 the model is then loaded partitioned (the Trainer's rule)
    args = SFTConfig(
        output_dir=a.output_dir, deepspeed=a.deepspeed or None, per_device_train_batch_size=a.micro_batch,
        num_train_epochs=a.epochs, learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0.1,
        max_length=a.seq_len, bf16=bf16, use_cpu=not torch.cuda.is_available(), logging_steps=2,
        save_strategy="no", report_to="none", seed=a.seed, disable_tqdm=True)
    adopt_process_group()  # ROSA: on CPU ranks, lets ZeRO-3's from_pretrained see the whole world
    model, tokenizer = load_model_and_tokenizer(a.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    chats = [r.fields for r in read_source("chatterbot").records[:a.max_train_samples]]  # {"messages": [...]}
    trainer = with_rosa(SFTTrainer)(  # ROSA (was: SFTTrainer)
        model=model, args=args, train_dataset=Dataset.from_list(chats), processing_class=tokenizer,
        peft_config=RosaConfig(rank=a.rank, seed=a.seed),  # ROSA (was: LoraConfig(...))
        schedule=ScheduleConfig(a.resample_every))  # ROSA
    trainer.train()
    trainer.save_model(f"{a.output_dir}/merged")  # the merged plain model (W = W_f + A B)
    if trainer.is_world_process_zero():
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}; {trainer.rosa.state.resamples} resamples; "
              f"merged model in {a.output_dir}/merged")
    return 0


if __name__ == "__main__":
    exit_now(main())
