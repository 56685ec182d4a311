"""ROSA on the model a Trainer is given, before the Trainer builds its optimizer or DeepSpeed:
the one path ``RosaTrainerMixin.__init__`` and a ``RosaCallback`` used alone both take.

It resolves the DeepSpeed config the Trainer will use (``--deepspeed`` or ``accelerate launch
--use_deepspeed``), refuses what cannot work, says once what would surprise a Trainer user, loads
a model given by name, and applies ROSA (``rosa_ds.ds.prepare.prepare_model``)."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..config import RosaConfig
from ..ds.config import fill_machine_autos
from ..ds.dist import adopt_process_group
from ..ds.prepare import prepare_model
from ..errors import set_field_words
from ..inject import iter_rosa_layers
from ..schedule import ScheduleConfig
from ..utils.log import warn_rank0
from .checks import RosaTrainerError, check_stage, check_training_args
from .words import trainer_words

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_model(model, args):
    """``model`` given by name or path (TRL's style): loaded as TRL's ``SFTTrainer`` would
    (``args.model_init_kwargs``, fp32 unless they say otherwise), after the arguments exist, so
    under ZeRO-3 it is loaded partitioned, on a CPU too (``adopt_process_group``). A model
    object is returned as it is. Call it for ``from_pretrained`` under ZeRO-3 in your own script."""
    if not isinstance(model, str):
        return model
    from transformers import AutoModelForCausalLM

    adopt_process_group()
    kwargs = {"dtype": torch.float32, **(getattr(args, "model_init_kwargs", None) or {})}
    if isinstance(kwargs["dtype"], str) and kwargs["dtype"] in DTYPES:
        kwargs["dtype"] = DTYPES[kwargs["dtype"]]
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except OSError as err:
        raise RosaTrainerError(f"model={model!r} could not be loaded ({str(err).splitlines()[0]}); give a model "
                               "directory, a cached hub name, or a model object") from None


def _fill_batch(config: dict, args) -> dict:
    """accelerate's DeepSpeed config as the Trainer will fill it from ``args`` (it does so only
    inside ``Trainer.__init__``, after ROSA must build its factors under ``zero.Init``)."""
    from accelerate.state import PartialState

    filled = copy.deepcopy(config)
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    values = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "train_batch_size": micro * gas * PartialState().num_processes}
    for key, value in values.items():
        if filled.get(key, "auto") == "auto":
            filled[key] = value
    for name, on in (("bf16", args.bf16), ("fp16", args.fp16)):
        if (filled.get(name) or {}).get("enabled") == "auto":
            filled[name] = {**filled[name], "enabled": bool(on)}
    return filled


def trainer_ds_config(args, schedule: ScheduleConfig) -> Optional[dict]:
    """The DeepSpeed config the Trainer will build its engine from (None without DeepSpeed)."""
    ds_config = check_training_args(args, schedule)
    if ds_config is not None:  # --deepspeed: the arguments' config, filled at their creation
        drop_template_scheduler(ds_config, args)
        return fill_machine_autos(ds_config)
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is None:
        return None
    # accelerate launch --use_deepspeed: the Trainer fills a copy of the plugin's config in __init__
    for live in (plugin.deepspeed_config, plugin.hf_ds_config.config):
        drop_template_scheduler(live, args, quiet=live is not plugin.deepspeed_config)
        fill_machine_autos(live)
    ds_config = _fill_batch(plugin.deepspeed_config, args)
    check_stage(ds_config, "accelerate's DeepSpeed config")
    return ds_config


def drop_template_scheduler(config: dict, args, quiet: bool = False) -> None:
    """A DeepSpeed ``scheduler`` block with "auto" values (the project's templates carry
    WarmupDecayLR) would replace the Trainer's ``lr_scheduler_type``; drop it, say so once. One
    written out in full is the user's choice and stays."""
    block = config.get("scheduler")
    if not block or "auto" not in (block.get("params") or {}).values():
        return
    del config["scheduler"]
    if not quiet:
            warn_rank0(f"the DeepSpeed config's scheduler {block.get('type')} (a template with \"auto\" values) is "
                   f"dropped: the Trainer's lr_scheduler_type={_plain(getattr(args, 'lr_scheduler_type', '?'))} drives "
                   "the learning rate; write its values out in the DeepSpeed config to use it instead")


def _plain(value) -> str:
    return str(getattr(value, "value", value))  # TrainingArguments holds an enum (SchedulerType.LINEAR)


def warn_cpu_bf16(args) -> None:
    """TRL's ``SFTConfig`` defaults to ``bf16=True``; on a CPU that trains in bfloat16 autocast,
    slower than fp32 there, without the user asking. Warned, not switched: the precision is
    already in accelerate's state and the DeepSpeed config built from these arguments."""
    if getattr(args, "bf16", False) and args.device.type == "cpu":
        warn_rank0("bf16=True on a CPU (SFTConfig's default): training runs in bfloat16, which is slower than fp32 on "
                   "most CPUs; pass bf16=False (SFTConfig(..., bf16=False)) to train in fp32")


def _precision_of(model) -> dict:
    """A DeepSpeed-style precision section for a model trained without DeepSpeed (its dtype)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {"bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}


def check_model(model, rosa_config: Optional[RosaConfig]) -> None:
    """Models ROSA cannot be applied to, refused before any weight changes."""
    if model is None:
        raise RosaTrainerError("RosaTrainer needs model=...; model_init is not supported (ROSA is applied once, "
                               "before DeepSpeed is built)")
    if hasattr(model, "peft_config"):
        raise RosaTrainerError("the model is a PEFT model (it has peft_config); ROSA replaces the adapter, it does "
                               "not stack on one: pass the base model, or merge_and_unload() it first")
    if rosa_config is None and not any(True for _ in iter_rosa_layers(model)):
        raise RosaTrainerError("RosaTrainer needs rosa_config=RosaConfig(rank=...) or a model passed through "
                               "rosa_ds.apply_rosa")


def prepare_for_trainer(model, args, rosa_config: Optional[RosaConfig],
                        schedule: ScheduleConfig) -> tuple[RosaConfig, Optional[dict]]:
    """Check, then apply ROSA to ``model`` in place (collective under a launcher); returns the
    resolved ``RosaConfig`` and the Trainer's DeepSpeed config (None without DeepSpeed)."""
    set_field_words(trainer_words)  # from here on rosa_ds's errors say TrainingArguments' names
    ds_config = trainer_ds_config(args, schedule)
    check_model(model, rosa_config)
    adopt_process_group()  # ROSA's factors are built under zero.Init on a partitioned model
    warn_cpu_bf16(args)
    rosa_config = prepare_model(model, rosa_config, ds_config if ds_config is not None else _precision_of(model))
    return rosa_config, ds_config
