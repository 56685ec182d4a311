"""The LoRA baseline's initialisations: PEFT's default and the ROSA paper code's."""
import pytest
import torch

from rosa_ds.recipe.baselines import apply_lora, is_lora_layer
from rosa_ds.recipe.config import parse_args
from tests.helpers.models import lm_batch, no_dropout_gpt2


def lora_layers(model):
    return [m for m in model.modules() if is_lora_layer(m)]


@pytest.mark.parametrize("init, scale", [("peft", 2.0), ("paper", 1.0)])
def test_lora_inits_start_at_the_pretrained_model(init, scale):
    torch.manual_seed(0)
    base = no_dropout_gpt2()
    batch = lm_batch(0, 1, 2)
    before = base(**batch).logits
    model = apply_lora(base, 4, init=init)
    layers = lora_layers(model)
    assert layers and all(m.scaling["default"] == scale for m in layers)
    assert torch.equal(model(**batch).logits, before)  # B A = 0 either way
    a = torch.cat([m.lora_A["default"].weight.detach().flatten() for m in layers])
    b = torch.cat([m.lora_B["default"].weight.detach().flatten() for m in layers])
    if init == "paper":  # A = 0, B ~ N(0, 1): only A receives a gradient at the first step
        assert not a.any() and abs(float(b.std()) - 1.0) < 0.05 and abs(float(b.mean())) < 0.05
    else:  # PEFT: A kaiming-uniform, B = 0
        assert not b.any() and a.abs().max() > 0


def test_lora_init_is_refused_outside_lora():
    assert parse_args(["--method", "lora", "--lora-init", "paper"]).lora_init == "paper"
    with pytest.raises(ValueError, match="--lora-init applies to --method lora only"):
        parse_args(["--method", "rosa", "--lora-init", "paper"])
