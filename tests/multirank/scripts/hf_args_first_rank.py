"""One rank of a TRL script written the way the README says for ZeRO-3, on CPU ranks started by
the ``deepspeed`` launcher: ``SFTConfig(deepspeed="ds_configs/zero3.json", use_cpu=True)`` first,
then ``with_rosa(SFTTrainer)(model="<path>", peft_config=RosaConfig(...))``. Records whether the
model was loaded partitioned, whether the template's WarmupDecayLR was dropped, and the learning
rate of each step (the Trainer's constant schedule, not the template's warmup); ``--result``."""
import argparse
import json

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rosa_ds import RosaConfig
from rosa_ds.hf import with_rosa
from rosa_ds.schedule import ScheduleConfig
from rosa_ds.utils.dist import exit_now

p = argparse.ArgumentParser()
p.add_argument("--model-dir", required=True)
p.add_argument("--out", required=True)
p.add_argument("--result", required=True)
p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
cli = p.parse_args()

LR = 1e-3
args = SFTConfig(output_dir=cli.out, deepspeed="ds_configs/zero3.json", per_device_train_batch_size=2, max_steps=4,
                 learning_rate=LR, lr_scheduler_type="constant", logging_steps=1, use_cpu=True, bf16=False,
                 report_to="none", save_strategy="no", max_length=None, disable_tqdm=True, seed=0)
ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
trainer = with_rosa(SFTTrainer)(model=cli.model_dir, args=args, peft_config=RosaConfig(rank=2, seed=7),
                                schedule=ScheduleConfig(2),
                                train_dataset=Dataset.from_list([{"input_ids": r.tolist()} for r in ids]))
partitioned = all(hasattr(q, "ds_id") for q in trainer.model.parameters())
trainer.train()
result = {"partitioned": partitioned, "scheduler_in_config": "scheduler" in args.hf_deepspeed_config.config,
          "lrs": [e["learning_rate"] for e in trainer.state.log_history if "loss" in e],
          "resample_steps": [e["step"] for e in trainer.rosa.state.events], "expected_lr": LR}
if torch.distributed.get_rank() == 0:
    with open(cli.result, "w") as f:
        json.dump(result, f)
exit_now(0)
