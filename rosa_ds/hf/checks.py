"""What the Trainer integration cannot do, refused before weights are touched, in one line each."""
from __future__ import annotations

from typing import Optional

from ..errors import ConfigError
from ..schedule import ScheduleConfig

# Trainer optimizers (``--optim``) whose state is not a lazily created per-parameter moment that
# a resample can drop: GaLore / APOLLO project gradients themselves, LOMO fuses the update into the
# backward pass, schedule-free keeps an averaged iterate of the (now re-drawn) factors.
UNRESETTABLE_OPTIMIZERS = ("galore", "apollo", "lomo", "adalomo", "schedule_free")


class RosaTrainerError(ConfigError):
    """A Trainer setup ROSA cannot train with; the message names the setting and the fix."""


def check_training_args(args, schedule: ScheduleConfig) -> Optional[dict]:
    """Refuse what cannot work; return the Trainer's DeepSpeed config (None without DeepSpeed)."""
    if args is None:
        raise RosaTrainerError("RosaTrainer needs args=TrainingArguments(...) (it reads --deepspeed and --optim "
                               "from them before the model is changed)")
    if getattr(args, "fsdp", None):
        raise RosaTrainerError("--fsdp is not supported by rosa_ds.hf (a resample rewrites DeepSpeed's fp32 masters "
                               "and optimizer state, which FSDP shards differently); use --deepspeed "
                               "ds_configs/zero3.json for sharded training")
    optim = str(getattr(args, "optim", "") or "")
    if optim.startswith(UNRESETTABLE_OPTIMIZERS):
        raise RosaTrainerError(f"--optim {optim} cannot be reset at a ROSA resample (its state is not per-parameter "
                               "Adam-style moments); use --optim adamw_torch, or an optimizer in the DeepSpeed config")
    if schedule.rewarmup_steps or schedule.restart_schedule:
        raise RosaTrainerError("ScheduleConfig(rewarmup_steps=..., restart_schedule=...) is not supported by "
                               "rosa_ds.hf: the Trainer's --lr-scheduler-type drives the learning rate; set "
                               "rewarmup_steps=0 and restart_schedule=False")
    if not getattr(args, "deepspeed", None):
        return None
    ds_config = args.hf_deepspeed_config.config
    check_stage(ds_config, f"the DeepSpeed config {args.deepspeed}")
    return ds_config


def check_stage(ds_config: dict, where: str) -> None:
    """ROSA resets its factors' optimizer state in ZeRO's flat groups: stages 1, 2 and 3 only."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise RosaTrainerError(f"{where} has zero_optimization.stage {stage}; ROSA resets its factors' state in "
                               "ZeRO's flat groups, so use stage 1, 2 or 3 (ds_configs/zero2.json, zero3.json)")
