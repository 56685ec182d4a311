"""Activation checkpointing and the activation census / prediction on tiny models, one process.

The references: the same model without checkpointing (gradients), a hand count of what a small
known graph saves (the census), and the census itself (the prediction, every family, method,
precision and attention implementation)."""
from __future__ import annotations

import itertools

import pytest
import torch
import transformers as tf
from torch import nn

from rosa_ds import RosaConfig
from rosa_ds.inject import apply_rosa
from rosa_ds.layer import RosaLinear
from rosa_ds.memory.activation_terms import predict_activations
from rosa_ds.memory.activations import measure_activations, transformer_layers
from rosa_ds.memory.counts import arch_from_config
from rosa_ds.recipe.baselines import apply_lora
from rosa_ds.recipe.models import enable_activation_checkpointing

B, S, R = 2, 48, 4


def configs():
    return {
        "llama": (tf.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128), tf.LlamaForCausalLM),
        "gpt2": (tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0),
                 tf.GPT2LMHeadModel),
        "bert": (tf.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                               vocab_size=128, num_labels=5), tf.BertForSequenceClassification),
    }


def build(family: str, method: str, attention: str = "sdpa", dtype=torch.float32, checkpointing=False, seed=0):
    cfg, cls = configs()[family]
    cfg._attn_implementation = attention
    torch.manual_seed(seed)
    model = cls(cfg)
    keep = ("classifier",) if family == "bert" else ()
    if method == "rosa":
        apply_rosa(model, RosaConfig(rank=R, modules_to_save=keep, seed=seed))
    elif method == "lora":
        model = apply_lora(model, R, modules_to_save=keep)
    model.to(dtype)  # after the adapters, as DeepSpeed casts the whole module (PEFT keeps them fp32)
    if checkpointing:
        enable_activation_checkpointing(model)
    return cfg, model


def batch_for(family: str, masked: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, S), generator=g)
    mask = torch.ones_like(ids)
    if masked:
        mask[1, S - 10:] = 0
    labels = torch.randint(0, 5, (B,), generator=g) if family == "bert" else ids
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapted_per_layer(model, layers: int) -> int:
    lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    return (sum(isinstance(m, RosaLinear) for m in model.modules()) + lora) // layers


# --------------------------------------------------------------------------- checkpointing
def grads(model, batch) -> dict:
    model.zero_grad(set_to_none=True)
    model.train()
    for m in model.modules():  # dropout off: the two runs must see the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,method", list(itertools.product(("llama", "gpt2", "bert"), ("rosa", "lora", "full"))))
def test_checkpointing_gives_the_same_gradients(family, method):
    """Non-reentrant checkpointing recomputes, it does not change the gradient: every trainable
    parameter's gradient equals the plain run's to 1e-6 relative (fp32), frozen base included."""
    batch = batch_for(family, masked=True)
    plain = grads(build(family, method)[1], batch)
    ckpt = grads(build(family, method, checkpointing=True)[1], batch)
    assert plain and plain.keys() == ckpt.keys()
    for name, g in plain.items():
        assert torch.linalg.vector_norm(ckpt[name] - g) <= 1e-6 * torch.linalg.vector_norm(g) + 1e-12, name


def test_checkpointing_really_recomputes_and_keeps_less():
    """The census of a checkpointed run is a fraction of the plain one (so the flag is live)."""
    batch = batch_for("llama")
    plain = measure_activations(build("llama", "rosa")[1], batch).total
    ckpt = measure_activations(build("llama", "rosa", checkpointing=True)[1], batch)
    assert ckpt.total < plain / 4 and ckpt.checkpoint_inputs > 0


def test_checkpointing_refuses_a_model_without_support():
    with pytest.raises(ValueError, match="does not support activation checkpointing"):
        enable_activation_checkpointing(nn.Linear(2, 2))


# --------------------------------------------------------------------------- census
class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Stack(nn.Module):
    def __init__(self, n=8, layers=3):
        super().__init__()
        self.inp = nn.Linear(n, n)
        self.layers = nn.ModuleList(Block(n) for _ in range(layers))

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x.square().sum()


def test_census_counts_a_known_graph_by_hand():
    """Per layer: Linear keeps its input (t x 8 fp32), ReLU its output (t x 8): 2 tensors; the
    input Linear keeps x; square keeps the last output; weights are not activations."""
    model, x = Stack(), torch.randn(5, 8)
    out = measure_activations(model, {"x": x}, loss_of=lambda loss: loss)
    unit = 5 * 8 * 4
    # layer i keeps relu(fc) output; its input is the previous output (already counted there,
    # deduplicated by storage) except for layer 0, whose input is the inp Linear's output
    assert out.before == unit  # x, kept by inp for its weight gradient
    assert out.layers == [2 * unit, unit, unit]
    assert out.after == 0  # square keeps the last relu output, already counted in layer 2
    assert out.total == 5 * unit


def test_transformer_layers_finds_the_blocks():
    assert len(transformer_layers(build("gpt2", "full")[1])) == 3
    with pytest.raises(ValueError, match="no list of repeated layers"):
        transformer_layers(nn.Linear(2, 2))


# --------------------------------------------------------------------------- prediction
# every family x method x attention in two cells (fp32 padded without checkpointing, bf16
# checkpointed), and llama (the main family) also in the crossed ones; bert has no causal mask
CELLS = [(torch.float32, False, True), (torch.bfloat16, True, False)]
CROSSED = [(torch.bfloat16, False, True), (torch.float32, True, True)]
CASES = [(f, m, a, d, c, k and f != "bert")
         for f, m, a in itertools.product(("llama", "gpt2", "bert"), ("full", "rosa", "lora"), ("sdpa", "eager"))
         for d, c, k in CELLS + (CROSSED if f == "llama" else [])]


@pytest.mark.parametrize("family,method,attention,dtype,checkpointing,masked", CASES)
def test_prediction_matches_the_census(family, method, attention, dtype, checkpointing, masked):
    """Term by term (rosa_ds.memory.activation_terms) within 1% of the census on every family,
    method, attention implementation, precision, with and without checkpointing and padding."""
    cfg, model = build(family, method, attention, dtype, checkpointing)
    measured = measure_activations(model, batch_for(family, masked)).total
    arch = arch_from_config(cfg, classification=family == "bert")
    targets = adapted_per_layer(model, cfg.num_hidden_layers) if method != "full" else 0
    pred = predict_activations(arch, B, S, 2 if dtype == torch.bfloat16 else 4, rank=R if targets else 0,
                               targets=targets, full=method == "full", checkpointing=checkpointing,
                               accelerator="cpu", masked=masked)
    assert abs(pred.saved / measured - 1) < 0.01, (pred.terms, measured)


def test_recompute_term_is_one_general_layer():
    """With checkpointing the peak adds one layer's full activations: the plain census's last layer."""
    cfg, model = build("llama", "rosa")
    plain = measure_activations(model, batch_for("llama"))
    arch = arch_from_config(cfg)
    pred = predict_activations(arch, B, S, 4, rank=R, targets=7, checkpointing=True, accelerator="cpu",
                               masked=False)
    assert pred.recompute == plain.layers[-1]
