"""ROSA in an ordinary Hugging Face Trainer script: SmolLM2-135M on BBC headlines, on DeepSpeed.

    deepspeed --num_gpus 2 examples/hf_trainer.py --output-dir DIR
    deepspeed --num_gpus 2 examples/hf_trainer.py --output-dir DIR --deepspeed ds_configs/zero3.json

What ROSA changes in a Trainer script is marked ``# ROSA``: the import, and ``RosaTrainer`` with
``rosa_config=`` / ``schedule=`` where the script built a ``Trainer``. Checkpoints go to
``DIR/checkpoint-N`` (resume with ``--resume``), TensorBoard logs to ``DIR/runs``, the merged plain
model (``from_pretrained`` loads it) to ``DIR/merged``.

The defaults (the first 128 training and 32 eval headlines, 64 tokens, 2 epochs, one resample
between them) finish in about 4 minutes on 2 CPU ranks (see docs/trainer.md); raise
``--max-train-samples`` for a real run. bf16 is used on a GPU that supports it, fp32 elsewhere.
"""
import argparse
import math

import torch
from transformers import TrainingArguments

from rosa_ds import RosaConfig
from rosa_ds.hf import RosaTrainer, adopt_process_group  # ROSA
from rosa_ds.recipe.data import DataConfig, PadCollator, load_data
from rosa_ds.recipe.models import load_model_and_tokenizer
from rosa_ds.schedule import ScheduleConfig
from rosa_ds.utils.dist import exit_now


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="checkpoints, TensorBoard logs and merged/ go here")
    p.add_argument("--deepspeed", default="ds_configs/zero2.json", help="DeepSpeed config (zero1/2/3 JSON)")
    p.add_argument("--model", default="default", help="default (SmolLM2-135M), a model directory or a .gguf file")
    p.add_argument("--rank", type=int, default=8, help="ROSA rank R")
    p.add_argument("--resample-every", default="epoch", help="epoch, never, or N optimizer steps")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-train-samples", type=int, default=128)
    p.add_argument("--max-eval-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="resume from the newest DIR/checkpoint-N")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args()


def main() -> int:
    a = parse()
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # the arguments first: under ZeRO-3 the model is then loaded partitioned (the Trainer's rule)
    args = TrainingArguments(
        output_dir=a.output_dir, deepspeed=a.deepspeed, per_device_train_batch_size=a.micro_batch,
        per_device_eval_batch_size=a.micro_batch, num_train_epochs=a.epochs, learning_rate=a.lr, warmup_steps=0.05,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=2, logging_steps=5, report_to="tensorboard", seed=a.seed, disable_tqdm=True)
    adopt_process_group()  # ROSA: on CPU ranks, lets ZeRO-3's from_pretrained see the whole world
    model, tokenizer = load_model_and_tokenizer(a.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    data = load_data(DataConfig(dataset="bbc-headlines", seq_len=a.seq_len, max_train_samples=a.max_train_samples,
                                max_eval_samples=a.max_eval_samples, seed=a.seed, num_samples=0), tokenizer)
    trainer = RosaTrainer(  # ROSA (was: Trainer)
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        rosa_config=RosaConfig(rank=a.rank, seed=a.seed),  # ROSA
        schedule=ScheduleConfig(a.resample_every))  # ROSA
    trainer.train(resume_from_checkpoint=True if a.resume else None)  # evaluates after each epoch
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(f"{a.output_dir}/merged")  # the merged plain model (W = W_f + A B)
    if trainer.is_world_process_zero():
        print(f"eval loss {after:.4f} (perplexity {math.exp(after):.1f}); "
              f"{trainer.rosa.state.resamples} resamples; merged model in {a.output_dir}/merged")
    return 0


if __name__ == "__main__":
    exit_now(main())
