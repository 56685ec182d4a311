"""From a checked ``RunSpec`` to a running engine: the process group, the model's weights (built
partitioned under ZeRO-3), the method applied, the DeepSpeed engine around it."""
from __future__ import annotations

import torch

from ..ds import config as dsconfig
from ..ds.dist import init_distributed
from ..ds.engine import initialize
from ..utils.log import log_rank0
from .data.encode_chat import chat_template
from .data.pack import prepare_packed_model
from .models import enable_activation_checkpointing, load_model_and_tokenizer, model_dir

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(spec) -> tuple:
    """(the engine, the DeepSpeed config it was given: ``spec.ds_config``, split for a client
    optimizer under ``--optim adamw8bit``)."""
    cfg, ds_config = spec.cfg, spec.ds_config
    torch.manual_seed(cfg.seed)
    dtype = TORCH_DTYPES[dsconfig.precision(ds_config)]
    partitioned = ds_config if dsconfig.zero_stage(ds_config) == 3 else None
    model_dir(spec.source)  # a GGUF's plain copy, converted while no process group exists
    init_distributed(cfg.dist_timeout)  # before the weights: zero.Init partitions as it builds
    labels = spec.raw.label_names
    model, _ = load_model_and_tokenizer(cfg.model, spec.task.name, len(labels) if labels else None, labels,
                                        dtype=dtype, partitioned=partitioned)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.data.chat_template:  # the exported model's tokenizer renders conversations as trained
        spec.tokenizer.chat_template = chat_template(spec.tokenizer, cfg.data)
    model, rosa_config = spec.method.prepare(model, cfg, tuple(cfg.rosa.modules_to_save or spec.task.keep(model)))
    optimizer = None
    if cfg.optim == "adamw8bit":
        ds_config, kwargs = dsconfig.client_optimizer_config(ds_config)
        optimizer = _bnb_factory(kwargs)
    engine = initialize(model, rosa_config, config=ds_config, optimizer=optimizer, schedule=cfg.schedule)
    engine.total_steps = spec.total_steps  # no resample after the final step
    if cfg.data.pack:  # every rank runs it (ZeRO-3 gathers inside the forward)
        gap = prepare_packed_model(engine.module, engine.device, 1e-4 if dtype == torch.float32 else 3e-2)
        log_rank0(f"packing verified: a sample's logits packed vs alone differ by {gap:.1e} (relative)")
    return engine, ds_config


def _bnb_factory(kwargs: dict):
    def make(params):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)

    return make
