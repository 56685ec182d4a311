"""Atomic checkpoints with ROSA state, exact resume, and the merged plain-model export.

Layout of ``save_dir``:

    latest                    the tag of the newest complete checkpoint (replaced atomically)
    <tag>/                    DeepSpeed's own files (module, ZeRO partitions, optimizer, scheduler)
        rosa_state.json       ROSA config, resample count and history, schedule, world layout
        rosa_frozen.safetensors   W_f of every layer (ZeRO-3 only: DeepSpeed does not restore
                                  frozen partitions there; under ZeRO-1/2 its module file has W_f)
        rosa_masters.safetensors  quantized base only: the fp32 host master of W_f per layer
                                  (not in DeepSpeed's files; the quantized buffers are re-made
                                  from it on load, bit-identical: quantization is deterministic)
        rosa_rng_rank<r>.pt   each rank's RNG states (dropout draws continue exactly)
        COMPLETE              written last, lists every file and its size

Everything is first written into ``<tag>.partial/``; only after all ranks finished does rank 0
write COMPLETE and rename the directory (an atomic ``os.replace`` on one filesystem), then
``latest``. A crash at any point leaves either the previous complete checkpoint or a
``.partial`` directory that loading refuses.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from . import zero
from .inject import iter_rosa_layers, merged_state_dict as merge_plain
from .log import log_rank0

if TYPE_CHECKING:
    from .engine import RosaEngine

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe(engine: "RosaEngine") -> dict:
    """The facts a resume must match: ROSA layers and rank, world size, ZeRO stage."""
    _, world = zero.rank_and_world()
    layers = [[n, l.out_features, l.in_features, l.rank] for n, l in iter_rosa_layers(engine.ds.module)]
    return {"world_size": world, "zero_stage": int(engine.ds.zero_optimization_stage()),
            "rosa_config": engine.rosa_config.to_dict() if engine.rosa_config else None, "layers": layers}


def _z3_frozen(engine: "RosaEngine") -> dict[str, torch.Tensor]:
    rank, _ = zero.rank_and_world()
    out = {}
    for name, layer in iter_rosa_layers(engine.ds.module):
        if layer.quantized:  # W_f is the host master (rosa_masters.safetensors)
            continue
        w = layer.base_layer.weight
        with zero.gathered([w]):  # collective, one layer at a time
            if rank == 0:
                out[name] = w.detach().cpu().clone()
    return out


def save(engine: "RosaEngine", root: Path, tag: str, client_state: dict) -> Path:
    rank, _ = zero.rank_and_world()
    final, partial = root / tag, root / f"{tag}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    engine.ds.save_checkpoint(str(root), tag=partial.name, client_state={"rosa_client": client_state},
                              save_latest=False)
    z3 = engine.ds.zero_optimization_stage() == 3
    frozen = _z3_frozen(engine) if z3 else {}
    if rank == 0:
        if z3:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in frozen.items()}, str(partial / "rosa_frozen.safetensors"))
        masters = _masters(engine)
        if masters:
            from safetensors.torch import save_file

            save_file(masters, str(partial / "rosa_masters.safetensors"))
        state = {"format": FORMAT, **describe(engine), "global_step": engine.global_step,
                 "schedule": {"resample_every": engine.schedule.resample_every,
                              "rewarmup_steps": engine.schedule.rewarmup_steps},
                 "state": vars(engine.state), "client_state": client_state}
        _atomic_write_text(partial / "rosa_state.json", json.dumps(state, indent=1))
    torch.save(_rng_state(), partial / f"rosa_rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        _atomic_write_text(partial / "COMPLETE", json.dumps({"tag": tag, "files": files}, indent=1))
        if final.exists():  # re-saving a tag: move the old one aside first, then drop it
            old = root / f"{tag}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        _atomic_write_text(root / "latest", tag)
    _barrier()
    log_rank0(f"checkpoint saved: {final}")
    return final


def _masters(engine: "RosaEngine") -> dict[str, torch.Tensor]:
    """Layer name -> fp32 master of W_f (quantized bases; replicated on every rank)."""
    return {n: l.base_master.contiguous() for n, l in iter_rosa_layers(engine.ds.module) if l.quantized}


@torch.no_grad()
def _restore_masters(engine: "RosaEngine", path: Path) -> None:
    """Every rank reads the masters and re-quantizes its buffers from them (no collective)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name, layer in iter_rosa_layers(engine.ds.module):
            if layer.quantized:
                layer.write_frozen(f.get_tensor(name))


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve(root: Path, tag: Optional[str]) -> tuple[Path, str]:
    """(save_dir, tag) from a save dir (uses ``latest``) or a checkpoint dir; clear errors."""
    if tag is None and (root / "COMPLETE").exists():
        return root.parent, root.name
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            partials = sorted(p.name for p in root.glob("*.partial")) if root.is_dir() else []
            hint = f" (found only incomplete saves: {', '.join(partials)})" if partials else ""
            raise CheckpointError(f"no complete checkpoint in {root}{hint}; check the path, or start without --resume")
        tag = latest.read_text().strip()
    ckpt = root / tag
    if not (ckpt / "COMPLETE").exists():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or missing (no COMPLETE marker: its save was "
                              "interrupted); resume from an earlier complete checkpoint or start again")
    return root, tag


def check_compatible(saved: dict, now: dict, ckpt: Path) -> None:
    """All differences between the checkpoint and this run, in one error."""
    problems = []
    for key, label in (("world_size", "world size (ranks)"), ("zero_stage", "ZeRO stage")):
        if saved.get(key) != now[key]:
            problems.append(f"{label}: checkpoint {saved.get(key)}, this run {now[key]}")
    s_cfg, n_cfg = saved.get("rosa_config") or {}, now["rosa_config"] or {}
    if s_cfg.get("rank") != n_cfg.get("rank"):
        problems.append(f"ROSA rank: checkpoint {s_cfg.get('rank')}, this run {n_cfg.get('rank')}")
    if s_cfg.get("quantize_base") != n_cfg.get("quantize_base"):
        problems.append(f"ROSA quantize_base: checkpoint {s_cfg.get('quantize_base')}, "
                        f"this run {n_cfg.get('quantize_base')}")
    s_layers, n_layers = [tuple(l) for l in saved.get("layers", [])], [tuple(l) for l in now["layers"]]
    if s_layers != n_layers:
        only_s = sorted({l[0] for l in s_layers} - {l[0] for l in n_layers})
        only_n = sorted({l[0] for l in n_layers} - {l[0] for l in s_layers})
        problems.append(f"ROSA target layers differ ({len(s_layers)} in checkpoint, {len(n_layers)} now; "
                        f"only in checkpoint: {only_s[:5]}, only now: {only_n[:5]})")
    if problems:
        raise CheckpointError(f"cannot resume from {ckpt}: " + "; ".join(problems)
                              + ". Resume with the same settings and number of ranks, or start a new run")


def load(engine: "RosaEngine", root: Path, tag: Optional[str]) -> dict:
    rank, _ = zero.rank_and_world()
    root, tag = resolve(root, tag)
    ckpt = root / tag
    saved = json.loads((ckpt / "rosa_state.json").read_text())
    check_compatible(saved, describe(engine), ckpt)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    missing = [f for f, size in manifest["files"].items()
               if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {len(missing)} files missing or truncated "
                              f"({', '.join(missing[:3])}); resume from another checkpoint")
    path, _ = engine.ds.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    if saved["zero_stage"] == 3:
        _restore_z3_frozen(engine, ckpt / "rosa_frozen.safetensors")
    if (ckpt / "rosa_masters.safetensors").is_file():
        _restore_masters(engine, ckpt / "rosa_masters.safetensors")
    _set_rng_state(torch.load(ckpt / f"rosa_rng_rank{rank}.pt", weights_only=False))
    for key, value in saved["state"].items():
        setattr(engine.state, key, value)
    log_rank0(f"resumed from {ckpt} at step {engine.global_step} after {engine.state.resamples} resamples")
    return saved.get("client_state", {})


@torch.no_grad()
def _restore_z3_frozen(engine: "RosaEngine", path: Path) -> None:
    from safetensors import safe_open

    rank, _ = zero.rank_and_world()
    with safe_open(str(path), framework="pt") as f:
        for name, layer in iter_rosa_layers(engine.ds.module):
            if layer.quantized:
                continue
            w = layer.base_layer.weight
            with zero.gathered([w], modifier_rank=0):
                if rank == 0:
                    w.copy_(f.get_tensor(name))


def merged_state_dict(engine: "RosaEngine") -> Optional[dict]:
    """Full plain-model state dict on rank 0 (None elsewhere); factors from the fp32 masters, a
    quantized W_f from its host master (exact: W = master + A B, no quantization error)."""
    rank, _ = zero.rank_and_world()
    model = engine.ds.module
    full = {}
    for name, p in model.named_parameters():  # collective, one parameter at a time
        if p.requires_grad:  # from the fp32 master; factors stay fp32 for the merge, others take the module dtype
            value = zero.full_fp32(p)
            if not name.rsplit(".", 1)[-1].startswith("rosa_"):
                value = value.to(p.dtype)
        else:
            with zero.gathered([p]):
                value = p.detach().clone() if rank == 0 else None
        if rank == 0:
            full[name] = value.cpu()
    if rank != 0:
        return None
    keys = set(model.state_dict().keys())
    full.update({n: b.detach().cpu() for n, b in model.named_buffers() if n in keys})
    return merge_plain(full, model) if any(True for _ in iter_rosa_layers(model)) else full


def save_merged(engine: "RosaEngine", out_dir: Path, tokenizer=None) -> Optional[Path]:
    """The final merged model as plain safetensors (written atomically on rank 0)."""
    rank, _ = zero.rank_and_world()
    state = merged_state_dict(engine)
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.ds.module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    _barrier()
    return out_dir if rank == 0 else None
