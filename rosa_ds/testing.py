"""Helpers for tests and benchmarks: tiny models from configs and real multi-process launches.

``launch_ranks`` starts N real processes (gloo on 127.0.0.1, a free port, a hard timeout) the
way DeepSpeed's launcher does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and
returns each rank's JSON result, so tests compare numbers instead of asserting that it ran.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, local_rank: int | None = None,
             local_world_size: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
        "LOCAL_SIZE": str(world_size if local_world_size is None else local_world_size),
        "LOCAL_WORLD_SIZE": str(world_size if local_world_size is None else local_world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
    })
    return env


def launch_ranks(script: str | Path, args: list[str] | None = None, world_size: int = 2,
                 timeout: float = 300, nodes: int = 1) -> list[Any]:
    """Run ``script`` on ``world_size`` ranks and return each rank's JSON result.

    The script receives ``--result PATH`` and must write its result there as JSON. With
    ``nodes > 1`` ranks are spread over simulated nodes (LOCAL_RANK restarts at 0 on each),
    so code that confuses local and global rank fails. Raises with every rank's output on a
    non-zero exit or on timeout (all ranks are killed).
    """
    port = free_port()
    per_node = world_size // nodes
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs, results = [], [], []
        for rank in range(world_size):
            res = Path(tmp) / f"rank{rank}.json"
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            cmd = [sys.executable, str(script), *(args or []), "--result", str(res)]
            env = rank_env(rank, world_size, port, local_rank=rank % per_node, local_world_size=per_node)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            logs.append(log)
            results.append(res)
        failed = None
        try:
            for rank, p in enumerate(procs):
                if p.wait(timeout=timeout) != 0 and failed is None:
                    failed = f"rank {rank} exited with {p.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout}s (stacks of the hung ranks below)"
            for p in procs:  # faulthandler prints every thread's Python stack on SIGABRT
                if p.poll() is None:
                    p.send_signal(signal.SIGABRT)
            time.sleep(3)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed:
            outputs = []
            for rank, log in enumerate(logs):
                log.seek(0)
                outputs.append(f"--- rank {rank} ---\n{log.read()[-6000:]}")
            raise RuntimeError(f"multi-rank launch failed: {failed}\n" + "\n".join(outputs))
        for log in logs:
            log.close()
        return [json.loads(r.read_text()) for r in results]


def tiny_model(kind: str = "gpt2", seed: int = 0, **overrides):
    """A tiny transformers model built from a config (milliseconds to run; no download)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=128, **overrides)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, vocab_size=128, **overrides)
        return tf.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, vocab_size=128, **overrides)
        return tf.BertModel(cfg)
    if kind == "bert-cls":
        cfg = tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, vocab_size=128, num_labels=3, **overrides)
        return tf.BertForSequenceClassification(cfg)
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


def adamw_reference(model, batch_fn, steps_per_epoch: int, epochs: int, lr: float, weight_decay: float = 0.01):
    """The single-process reference multi-rank runs are compared with: plain torch AdamW on the
    global batch ``batch_fn(step)``, a resample after every epoch but the last with the optimizer
    state cleared (zero moments AND step counter, as the engine does). Returns (per-step losses,
    the merged plain model's state dict)."""
    import torch

    from .inject import merge_and_unload, resample

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=weight_decay)
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
            opt.state.clear()  # a fresh Adam: zero moments, step counter 0
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
