"""Tiny models, batches, DeepSpeed test configs and the single-process reference for tests."""
from __future__ import annotations


def tiny_model(kind: str = "gpt2", seed: int = 0, hidden: int = 32, intermediate: int = 48, positions: int = 64,
               vocab: int = 128, **overrides):
    """A tiny transformers model (2 layers, ``hidden`` wide) built from a config: milliseconds to
    run, no download. ``overrides`` go into the config (token ids, dropout, num_labels ...)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=positions, vocab_size=vocab)
    if kind == "gpt2":
        kw = {"n_embd": hidden, "n_layer": 2, "n_head": 2, "n_positions": positions, "vocab_size": vocab, **overrides}
        return tf.GPT2LMHeadModel(tf.GPT2Config(**kw))
    if kind == "llama":
        kw = {**common, "hidden_size": hidden, "intermediate_size": intermediate, "num_key_value_heads": 2, **overrides}
        return tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    if kind in ("bert", "bert-cls"):
        kw = {**common, "hidden_size": hidden, "intermediate_size": intermediate,
              **({"num_labels": 3} if kind == "bert-cls" else {}), **overrides}
        cls = tf.BertForSequenceClassification if kind == "bert-cls" else tf.BertModel
        return cls(tf.BertConfig(**kw))
    raise ValueError(f"unknown tiny model kind {kind!r}; choose gpt2, llama, bert, bert-cls")


def lm_batch(step: int, world_size: int, micro_batch: int, rank: int | None = None, seq_len: int = 16,
             vocab: int = 128):
    """The global batch of optimizer step ``step`` (fixed length, so every rank's mean loss
    weighs the same number of tokens), or this ``rank``'s slice of it."""
    import torch

    g = torch.Generator().manual_seed(10_000 + step)
    ids = torch.randint(0, vocab, (world_size * micro_batch, seq_len), generator=g)
    if rank is not None:
        ids = ids[rank * micro_batch:(rank + 1) * micro_batch]
    return {"input_ids": ids, "labels": ids.clone()}


def no_dropout_gpt2(seed: int = 0):
    """Tiny GPT-2 without dropout: runs on different world sizes draw the same function."""
    return tiny_model("gpt2", seed=seed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def adamw_reference(model, batch_fn, steps_per_epoch: int, epochs: int, lr: float, weight_decay: float = 0.01,
                    optimizer: str = "adamw"):
    """The single-process reference multi-rank runs are compared with: plain torch AdamW (or, with
    ``optimizer="sgd"``, SGD without momentum) on the global batch ``batch_fn(step)``, a resample
    after every epoch but the last with the factors' optimizer state cleared (zero moments AND
    step counter, as the engine does). Returns (per-step losses, the merged plain model's state dict)."""
    import torch

    from rosa_ds.inject import merge_and_unload, resample
    from rosa_ds.layer import is_adapter_param

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    losses = []
    for step in range(steps_per_epoch * epochs):
        loss = model(**batch_fn(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        epoch, end = divmod(step + 1, steps_per_epoch)
        if end == 0 and epoch < epochs:
            resample(model, resample_index=epoch)
            for name, p in model.named_parameters():  # the factors' Adam restarts (zero moments, step 0);
                if is_adapter_param(name):  # a trainable head (modules_to_save) keeps its state
                    opt.state.pop(p, None)
    return losses, merge_and_unload(model).state_dict()


def ds_test_config(stage: int, dtype: str = "fp32", micro_batch: int = 2, lr: float = 1e-3,
                   offload: bool = False) -> dict:
    """A small DeepSpeed config for tests: torch AdamW, no clipping, small buckets."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000,
                              "stage3_prefetch_bucket_size": 100_000, "stage3_param_persistence_threshold": 100,
                              "stage3_max_live_parameters": 1_000_000},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": 8},
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        cfg["optimizer"]["params"].pop("torch_adam")
    return cfg
