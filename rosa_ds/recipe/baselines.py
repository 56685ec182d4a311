"""The baselines trained through the same engine: PEFT LoRA and full fine-tuning.

LoRA goes through PEFT (the implementation users know) on exactly the modules ROSA would adapt,
so a comparison at equal rank has equal trainable counts. Its export merges W += s B A (s =
alpha / r; transposed for GPT-2's Conv1D) from a full state dict, which works under ZeRO-3 where
PEFT's own ``merge_and_unload`` would see empty partitions.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import RosaConfig
from ..errors import ConfigError
from ..inject import find_targets

PEFT_PREFIX = "base_model.model."
LORA_INITS = ("peft", "paper")


def apply_lora(model: nn.Module, rank: int, target_modules=None, modules_to_save=(), alpha: float | None = None,
               init: str = "peft"):
    """PEFT LoRA on the modules ROSA would adapt (same targets, same validation and errors).

    ``init``: ``peft`` is PEFT's default (down projection A kaiming-uniform, up projection B = 0)
    with scale alpha / r = 2; ``paper`` is LoRA as the ROSA paper's released code builds it
    (``peftnet``'s ``PeftLinear``: y = x W + (x a) b with a = 0 (in × r), b ~ N(0, 1) (r × out), no
    scale), i.e. PEFT's A = 0, B ~ N(0, 1), alpha = r. Under that init the first gradient reaches
    only A and is scaled by B's unit-variance entries whatever R, which is one reason the paper's
    LoRA looks flat in R under plain SGD at a shared learning rate; it exists to reproduce that
    protocol, not as a recommended setting.
    """
    from peft import LoraConfig, get_peft_model

    if init not in LORA_INITS:
        raise ConfigError(f"LoRA init {init!r} is not known; use one of {', '.join(LORA_INITS)}")
    targets = [n for n, _ in find_targets(model, RosaConfig(rank=rank, target_modules=target_modules,
                                                                  modules_to_save=tuple(modules_to_save)))]
    fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
    alpha = rank if init == "paper" else (alpha or 2 * rank)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=fan_in_fan_out, modules_to_save=list(modules_to_save) or None)
    # autocast_adapter_dtype=False: the adapters take their base layer's dtype. PEFT's default
    # upcasts bf16 adapters to fp32, which DeepSpeed undoes only for a model it casts itself: ZeRO-2
    # trained bf16 adapters and ZeRO-3 (model built bf16 under zero.Init) fp32 ones, and a bf16
    # head beside fp32 adapters trips ZeRO-3's one-dtype defragment
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if init == "paper":
        paper_lora_init(peft_model)
    return peft_model


@torch.no_grad()
def paper_lora_init(peft_model: nn.Module) -> None:
    """A = 0, B ~ N(0, 1) on every LoRA layer (the ROSA paper code's LoRA; the product is 0, so
    the model starts as the pretrained one)."""
    for module in peft_model.modules():
        if is_lora_layer(module):
            for adapter in module.lora_A:
                module.lora_A[adapter].weight.zero_()
                module.lora_B[adapter].weight.normal_(0.0, 1.0)


def lora_merged_state_dict(state: dict[str, torch.Tensor], peft_model) -> dict[str, torch.Tensor]:
    """Plain-model state dict from a full PEFT LoRA state dict: W = W0 + s B A, merged in fp32."""
    config = peft_model.peft_config["default"]
    scale = config.lora_alpha / config.r
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key or ("modules_to_save" in key and ".original_module." in key):
            continue
        plain = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        plain = plain.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len("base_layer.weight")]
            a, b = state[prefix + "lora_A.default.weight"].float(), state[prefix + "lora_B.default.weight"].float()
            delta = scale * (b @ a)
            value = (value.float() + (delta.t() if config.fan_in_fan_out else delta)).to(value.dtype)
        out[plain] = value
    return out


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer: its base weight and factors are merged together at export."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def lora_transform(peft_model):
    """The export's unit transform for a PEFT model (``rosa_ds.ds.export.save_model``)."""
    return lambda unit, values, master: lora_merged_state_dict(values, peft_model)

