"""The training recipe behind ``launch/train.py``: setup -> train -> evaluate -> save.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json      # N ranks (DeepSpeed launcher)
    python launch/train.py                                           # one process

Everything that can be wrong with the input (model, data, fields, sequence length, batch sizes,
DeepSpeed JSON) is checked in ``Trainer.check`` before the model's weights are loaded.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..ds import config as dsconfig
from ..ds import verify
from ..ds.agree import CheckpointError
from ..ds.checkpoint import remove_partials
from ..ds.dist import PeakMemory, all_reduce, init_distributed, run_peak_bytes, shutdown_distributed, synchronize
from ..ds.engine import initialize
from ..ds.export import NonFiniteExport, save_model
from ..errors import ConfigError
from ..inject import trainable_report
from ..memory.activations import census
from ..utils.dist import rank_and_world
from ..utils.log import log_rank0, warn_rank0
from ..utils.sizes import format_size, parse_size
from .baselines import apply_lora, classification_head, is_lora_layer, lora_transform
from .config import TrainConfig, save_resolved
from .data import BatchOrder, PackCollator, PackedSplit, PadCollator, batch_tokens, check_data, tokenize_data
from .data.encode_chat import chat_template
from .data.pack import prepare_packed_model
from .faults import Diverged, OutputLock, Preempted, StopRequest, claim_output_dir
from .memory_report import write_run_report
from .metrics import MetricsWriter, classification_metrics, eval_postfix, progress, rewind, write_predictions
from .models import (
    check_model_spec,
    enable_activation_checkpointing,
    load_config,
    load_model_and_tokenizer,
    load_tokenizer,
    model_dir,
    model_max_length,
)
from .preflight import check_fits
from .resume import notice, plan_facts, refusal

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, cfg: TrainConfig, stop: Optional[StopRequest] = None) -> None:
        self.cfg = cfg
        self.rank, self.world = rank_and_world()
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.last_eval: Optional[dict] = None  # classification: the latest eval scores, shown in the bar
        self.step_peak = 0  # accelerator peak bytes over training steps (GPU only; see PeakMemory)
        self.activations: Optional[dict] = None  # census of the first micro step (memory report)
        self.stop = stop or StopRequest()  # SIGTERM/SIGINT -> checkpoint after the current step (``faults``)
        self.lock = OutputLock(self.out)
        self.last_checkpoint: Optional[Path] = None
        self.saved_step = -1
        self.nan_in_row = 0  # --nan-policy skip: consecutive non-finite steps
        self.nan_skipped = 0
        self.resume_changes: list = []  # schedule changes a resume makes (``recipe.resume.notice``)

    # --- 1. cheap checks: every bad input fails here, in one line ------------------------
    def check(self) -> None:
        cfg = self.cfg
        check_output_dir(self.out)
        if self.rank == 0:
            self.lock.acquire()  # one run per --output-dir (released by ``run``)
        claim_output_dir(self.out, bool(cfg.resume), cfg.overwrite_output_dir, self.rank)
        self.source = check_model_spec(cfg.model, cfg.data.task)
        self.raw = check_data(cfg.data)  # before the model config: reading it from a GGUF takes seconds
        model_config = load_config(self.source)
        max_len = model_max_length(model_config)
        if max_len is not None and cfg.data.seq_len > max_len:
            raise ConfigError(f"--seq-len {cfg.data.seq_len} is longer than the model's context ({max_len} tokens); "
                              f"use --seq-len {max_len} or less")
        self.ds_config = self.plan_steps(len(self.raw.train))
        self.fit = check_fits(cfg, model_config, self.ds_config, self.world)  # before any weight loads
        # Tokenized here, not in setup: chat-template errors, conversations truncated away and the
        # number of packs are known before the model loads (a GGUF's tokenizer comes from its plain
        # copy, converted once, after the memory check above).
        self.tokenizer = load_tokenizer(self.source)
        self.data = tokenize_data(self.raw, self.tokenizer)
        self.train_set = PackedSplit(self.data.train, cfg.data.seq_len) if cfg.data.pack else self.data.train
        if cfg.data.pack:
            log_rank0(f"packed {len(self.data.train)} samples into {len(self.train_set)} rows of <= "
                      f"{cfg.data.seq_len} tokens ({self.train_set.stats()['fill']:.0%} full)")
        self.ds_config = self.plan_steps(len(self.train_set))  # rows: packs, or the samples kept
        self.plan = plan_facts(cfg, self.ds_config, self.raw.train)  # recorded with every checkpoint
        self.resume_from = self.choose_checkpoint(cfg.resume) if cfg.resume else None
        if cfg.tensorboard:
            self.ds_config["tensorboard"] = {"enabled": True, "output_path": str(self.out / "tb"),
                                             "job_name": "rosa_ds"}

    def plan_steps(self, rows: int) -> dict:
        """Batch order and step count for ``rows`` training rows; the DeepSpeed config they fill."""
        cfg = self.cfg
        self.order = BatchOrder(rows, cfg.micro_batch, self.world, self.rank, cfg.grad_accum, cfg.seed)
        spe = self.order.steps_per_epoch
        self.total_steps = min(cfg.max_steps or spe * cfg.epochs, spe * cfg.epochs)
        return dsconfig.build_ds_config(cfg.deepspeed, cfg.run_values(self.total_steps), self.world)

    # --- 2. heavy setup --------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        labels = self.raw.label_names
        task = cfg.data.task
        dtype = TORCH_DTYPES[dsconfig.precision(self.ds_config)]
        partitioned = self.ds_config if dsconfig.zero_stage(self.ds_config) == 3 else None
        model_dir(self.source)  # a GGUF's plain copy, converted while no process group exists
        init_distributed(cfg.dist_timeout)  # before the weights: zero.Init partitions as it builds
        model, _ = load_model_and_tokenizer(cfg.model, task, len(labels) if labels else None, labels, dtype=dtype,
                                            partitioned=partitioned)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.data.chat_template:  # the exported model's tokenizer renders conversations as trained
            self.tokenizer.chat_template = chat_template(self.tokenizer, cfg.data)
        keep = tuple(cfg.rosa.modules_to_save or (classification_head(model) if task == "classification" else ()))
        rosa_config, optimizer = None, None
        if cfg.method == "rosa":
            rosa_config = dataclasses.replace(cfg.rosa, modules_to_save=keep)
        elif cfg.method == "lora":
            model = apply_lora(model, cfg.rosa.rank, cfg.rosa.target_modules, keep, init=cfg.lora_init)
        if cfg.optim == "adamw8bit":
            self.ds_config, kwargs = dsconfig.client_optimizer_config(self.ds_config)
            optimizer = _bnb_factory(kwargs)
        self.engine = initialize(model, rosa_config, config=self.ds_config, optimizer=optimizer, schedule=cfg.schedule)
        self.engine.total_steps = self.total_steps  # no resample after the final step
        self.rank, self.world = rank_and_world()
        self.collate = PadCollator(self.tokenizer.pad_token_id)  # evaluation: one sample per row
        self.train_collate = PackCollator(self.tokenizer.pad_token_id) if cfg.data.pack else self.collate
        if cfg.data.pack:  # every rank runs it (ZeRO-3 gathers inside the forward)
            gap = prepare_packed_model(self.engine.module, self.engine.device, 1e-4 if dtype == torch.float32 else 3e-2)
            log_rank0(f"packing verified: a sample's logits packed vs alone differ by {gap:.1e} (relative)")
        self.precision, self.ds_skipped = dsconfig.precision(self.ds_config), 0
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", enabled=self.rank == 0)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.out / "config.json", self.ds_config)
            report = trainable_report(self.engine.module)
            log_rank0(f"{cfg.method}: trainable {report.trainable:,} of {report.total:,} parameters"
                      + (f", rho {report.rho:.1f}" if cfg.method == "rosa" else ""))
        self.start_epoch, self.skip = 0, 0
        if self.resume_from is not None:
            self.resume(self.resume_from)

    def choose_checkpoint(self, where: str) -> Path:
        """The intact checkpoint ``--resume`` loads, verified on every rank and checked against
        this run's settings from the files alone, before any weight loads (``rosa_ds.ds.verify``)."""
        start = time.perf_counter()
        if where == "latest" and not self.ckpt_dir.is_dir():
            raise CheckpointError(f"--resume: --output-dir {self.out} holds no checkpoints (no {self.ckpt_dir}); "
                                  "check --output-dir, or start without --resume")
        choice = verify.choose(self.ckpt_dir if where == "latest" else Path(where))
        for line in choice.warnings:
            warn_rank0(line)
        now = {**self.plan, "world_size": self.world, "zero_stage": dsconfig.zero_stage(self.ds_config)}
        if self.cfg.method == "rosa":
            now["quantize_base"] = self.cfg.rosa.quantize_base
        try:
            self.resume_changes = verify.check_choice(choice, now)
        except verify.ResumeMismatch as exc:
            raise CheckpointError(refusal(exc)) from None
        log_rank0(f"resuming from {choice.path} (step {choice.saved.get('global_step')}): its files are intact "
                  f"(checked in {time.perf_counter() - start:.2f}s)")
        return choice.path

    def resume(self, path: Path) -> None:
        """Load the chosen checkpoint; cut metrics.jsonl back to its step (recomputed steps once)."""
        client = self.engine.load_checkpoint(path)
        self.start_epoch, self.skip = client["epoch"], client["batches_in_epoch"]
        self.saved_step, self.last_checkpoint = self.engine.global_step, path
        if self.rank == 0:
            stale = remove_partials(self.ckpt_dir)  # every rank is past its checks (the process group exists)
            if stale:
                log_rank0(f"removed the interrupted saves {', '.join(stale)} from {self.ckpt_dir}")
            dropped = rewind(self.metrics.path, self.engine.global_step)
            if dropped:
                log_rank0(f"metrics.jsonl rewound to step {self.engine.global_step}: {dropped} later records dropped")
        if self.resume_changes:
            line, changes = notice(path, self.resume_changes)
            log_rank0(line)
            self.metrics.write({"event": "resume_changes", "step": self.engine.global_step, "changes": changes})

    # --- 3. the loop -------------------------------------------------------------------------
    def loader(self, epoch: int, skip: int):
        batches = self.order.micro_batches(epoch, skip_batches=skip)
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=batches, collate_fn=self.train_collate)

    def train(self) -> None:
        cfg, eng = self.cfg, self.engine
        if eng.global_step == 0:
            self.evaluate(0)  # the starting point: the pretrained model (ROSA's W_f + A B = W)
        self.stop.begin_training()
        bar = progress(self.total_steps, initial=eng.global_step, enabled=self.rank == 0)
        for epoch in range(self.start_epoch, cfg.epochs):
            skip, self.skip = self.skip, 0
            done_in_epoch = skip
            tokens, losses, t0 = 0, [], time.perf_counter()
            for batch in self.loader(epoch, skip):
                if eng.global_step >= self.total_steps:
                    break
                tokens += batch_tokens(batch)  # real tokens, on the host batch: no device sync
                loss, event = self.micro_step(batch)
                losses.append(loss)
                if not eng.at_boundary:  # a micro step inside an accumulation
                    continue
                done_in_epoch += 1
                rec, stop = self.log_step(epoch, losses, tokens, t0)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                **eval_postfix(self.last_eval))
                tokens, losses, t0 = 0, [], time.perf_counter()
                if event:
                    self.metrics.write(event)
                if stop:  # every rank agreed in log_step's all-reduce: stop after this step
                    self.preempt(epoch, done_in_epoch)
                if cfg.eval_every and eng.global_step % cfg.eval_every == 0:
                    self.evaluate(epoch)
                last = done_in_epoch >= self.order.steps_per_epoch or eng.global_step >= self.total_steps
                if cfg.save_every and eng.global_step % cfg.save_every == 0 and not last:  # last: saved below
                    self.save(epoch, done_in_epoch)
            finished = done_in_epoch >= self.order.steps_per_epoch
            if finished:
                event = eng.end_epoch(epoch, cfg.epochs)
                if event:
                    self.metrics.write(event)
            if not cfg.eval_every:
                self.evaluate(epoch + 1 if finished else epoch)
            if self.saved_step != eng.global_step or finished:  # not twice at --max-steps = a --save-every step
                self.save(epoch + 1, 0) if finished else self.save(epoch, done_in_epoch)
            if eng.global_step >= self.total_steps:
                break
        bar.close()

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, Optional[dict]]:
        """Forward, backward and (at accumulation boundaries) optimizer step on one host batch,
        moved to the engine's device. Returns (detached fp32 loss on the device, resample event)."""
        eng = self.engine
        eng.train()
        peak = PeakMemory()  # the training step's own peak: eval, resample and saves are not in it
        if self.activations is None:  # the first micro step runs under the activation census
            with census(eng.module) as saved:
                loss = eng(**to_device(batch, eng.device)).loss
            mask = batch.get("attention_mask")
            packed = "position_ids" in batch  # transformers builds a block-diagonal mask per layer
            self.activations = {"measured": saved.total, "micro_batch": int(batch["input_ids"].shape[0]),
                                "seq_len": int(batch["input_ids"].shape[1]),
                                "masked": packed or bool(mask is not None and not bool(mask.all()))}
        else:
            loss = eng(**to_device(batch, eng.device)).loss
        eng.backward(loss)
        event = eng.step()
        self.step_peak = max(self.step_peak, peak.read("train_step").get("train_step_peak_bytes", 0))
        return loss.detach().float(), event

    def log_step(self, epoch: int, losses: list, tokens: int, started: float) -> tuple[dict, bool]:
        """The step's record (mean loss over ranks, tokens/s over the step begun at ``started``,
        a ``perf_counter`` reading), the non-finite policy applied, and whether every rank is to
        stop now: one all-reduce carries the loss, the token count and each rank's stop request,
        so all ranks decide alike. The clock is read once the accelerator has finished the step's
        queued work (a GPU returns from ``step()`` before its kernels have run)."""
        eng = self.engine
        synchronize()
        seconds = time.perf_counter() - started
        local = [float(tokens), float(self.stop.requested)]
        stats = torch.cat([torch.stack(losses).mean().double().reshape(1),
                           torch.tensor(local, dtype=torch.float64, device=eng.device)])
        loss, tokens_all, stops = all_reduce(stats).tolist()
        rec = {"step": eng.global_step, "epoch": epoch, "loss": loss / self.world,
               "lr": eng.optimizer.param_groups[0]["lr"], "tokens_per_s": tokens_all / max(seconds, 1e-9),
               "step_seconds": round(seconds, 4), **grad_norm_record(eng.grad_norm(), self.ds_config)}
        eng.write_scalars({"grad_norm": rec["grad_norm"]})
        diverged = self.check_finite_step(rec)
        self.metrics.write(rec)
        if diverged is not None:
            raise diverged
        return rec, stops > 0

    def check_finite_step(self, rec: dict) -> Optional[Diverged]:
        """``--nan-policy``: a non-finite loss (any rank's: the all-reduced sum is then non-finite)
        or a step DeepSpeed dropped for non-finite gradients (its overflow check is itself agreed
        across ranks; under fp16 such drops are loss scaling at work and not counted)."""
        eng, cfg = self.engine, self.cfg
        dropped = int(getattr(eng.ds, "skipped_steps", 0)) > self.ds_skipped and self.precision != "fp16"
        self.ds_skipped = int(getattr(eng.ds, "skipped_steps", 0))
        if math.isfinite(rec["loss"]) and not dropped:
            self.nan_in_row = 0
            return None
        what = "loss" if not math.isfinite(rec["loss"]) else "gradients"
        last = self.last_good()
        if cfg.nan_policy == "stop":
            return Diverged(f"non-finite {what} at step {rec['step']} (--nan-policy stop): nothing saved after it; "
                            f"{last}; lower --lr, or resume with --nan-policy skip")
        if not dropped:
            return Diverged(f"non-finite {what} at step {rec['step']} and DeepSpeed applied the step anyway (it drops "
                            "non-finite steps when gradient_clipping > 0 in the DeepSpeed JSON); "
                            f"{last}; set gradient_clipping, or lower --lr")
        self.nan_in_row += 1
        self.nan_skipped += 1
        rec.update(skipped=True, skipped_total=self.nan_skipped)
        log_rank0(f"non-finite {what} at step {rec['step']}: step dropped on every rank "
                  f"({self.nan_in_row} in a row, limit --nan-skip-limit {cfg.nan_skip_limit})")
        if self.nan_in_row >= cfg.nan_skip_limit:
            return Diverged(f"{self.nan_in_row} non-finite steps in a row up to step {rec['step']} "
                            f"(--nan-skip-limit {cfg.nan_skip_limit}): {last}; lower --lr")
        return None

    def last_good(self) -> str:
        """Where a diverged run can be resumed from (no checkpoint is ever written from a
        non-finite state, so the newest one is good)."""
        if self.last_checkpoint is None:
            return "there is no checkpoint"
        return f"the last good checkpoint is {self.last_checkpoint}"

    def preempt(self, epoch: int, batches_in_epoch: int) -> None:
        """Checkpoint at the current step (unless it was just saved) and stop (exit 75)."""
        if self.saved_step != self.engine.global_step:
            self.save(epoch, batches_in_epoch)
        self.stop.saved = True
        reasons = self._gather([self.stop.reason] if self.stop.reason else [])  # the rank that saw it says why
        reason = reasons[0] if reasons else "a stop request"
        self.metrics.write({"event": "preempted", "step": self.engine.global_step, "reason": reason,
                            "checkpoint": str(self.last_checkpoint)})
        raise Preempted(f"stopped ({reason}) after step {self.engine.global_step}: checkpoint "
                        f"{self.last_checkpoint} saved; continue with --resume")

    # --- 4. evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, epoch: int) -> Optional[dict]:
        if self.data.eval is None or len(self.data.eval) == 0:
            return None
        eng, split = self.engine, self.data.eval
        eng.eval()
        mine = list(range(self.rank, len(split), self.world))  # strided shards: every sample once
        loss_sum = torch.zeros(2, dtype=torch.float64, device=eng.device)  # (sum of losses, count)
        preds, golds, rows = [], [], []
        largest_shard = math.ceil(len(split) / self.world)  # same loop length on every rank
        for start in range(0, largest_shard, self.cfg.micro_batch):
            idx = mine[start:start + self.cfg.micro_batch] or [0]  # a throwaway batch keeps ZeRO-3 in step
            batch = self.collate([split[i] for i in idx])
            out = eng(**to_device(batch, eng.device))  # every rank runs the same number of forwards (ZeRO-3)
            if not mine[start:start + self.cfg.micro_batch]:
                continue
            n = len(idx) if self.cfg.data.task == "classification" else int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += torch.stack([out.loss.double() * n, loss_sum.new_tensor(n)])
            if self.cfg.data.task == "classification":
                preds += out.logits.argmax(-1).tolist()
                golds += batch["labels"].tolist()
                rows += zip(idx, out.logits.float().tolist())
        total, count = all_reduce(loss_sum).tolist()
        loss = total / max(count, 1)
        rec = {"event": "eval", "step": eng.global_step, "epoch": epoch, "eval_loss": loss,
               "eval_perplexity": math.exp(min(loss, 50))}
        if self.cfg.data.task == "classification":
            rec.update(classification_metrics(self._gather(preds), self._gather(golds), len(self.data.label_names)))
            rows = self._gather(rows)
            if self.rank == 0:
                write_predictions(self.out / "eval_predictions.jsonl", rows, split.labels.tolist(),
                                  self.data.label_names)
            self.last_eval = rec
        else:
            rec["samples"] = self.generate_samples()
        self.metrics.write(rec)
        log_rank0(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in rec.items() if k != "samples"))
        return rec

    def _gather(self, values: list) -> list:
        if self.world == 1:
            return values
        out = [None] * self.world
        dist.all_gather_object(out, values)
        return [v for part in out for v in part]

    def generate_samples(self) -> list[dict]:
        """Greedy continuations of the fixed eval prompts (all ranks run generate: ZeRO-3)."""
        prompts = self.data.eval_prompts[: self.cfg.data.num_samples]
        samples, module = [], self.engine.module
        for p in prompts:
            ids = torch.tensor([p.prompt_ids], device=self.engine.device)
            out = module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  synced_gpus=self.engine.zero_optimization_stage() == 3 and self.world > 1)
            text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            samples.append({"prompt": p.prompt[-200:], "reference": p.reference, "generated": text})
        return samples

    # --- 5. checkpoints and the final model ----------------------------------------------
    def save(self, epoch: int, batches_in_epoch: int, keep: int = 2) -> None:
        """Checkpoint; keep the ``keep`` newest complete ones (two survive a newest one damaged
        after its save). A ``checkpoint`` event records its save time and size."""
        start = time.perf_counter()
        if not self.trainable_finite():
            raise Diverged(f"non-finite trainable weights at step {self.engine.global_step}: no checkpoint written; "
                           f"{self.last_good()}; lower --lr")
        path = self.engine.save_checkpoint(self.ckpt_dir, client_state={"epoch": epoch, "batches_in_epoch":
                                                                         batches_in_epoch, "plan": self.plan})
        seconds = time.perf_counter() - start
        self.last_checkpoint, self.saved_step = path, self.engine.global_step
        self.engine.prune_checkpoints(self.ckpt_dir, keep)
        if self.rank == 0:
            self.metrics.write({"event": "checkpoint", "step": self.engine.global_step, "seconds": round(seconds, 3),
                                "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                                "frozen_record_bytes": frozen_bytes(path)})

    def trainable_finite(self) -> bool:
        """Every rank's trainable values (its ZeRO-3 partition, or the replicated copy) are finite."""
        local = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters() if p.requires_grad]
        bad = sum(int(not bool(torch.isfinite(t).all())) for t in local if t.numel())
        return all_reduce(torch.tensor([float(bad)], device=self.engine.device)).item() == 0

    def export(self) -> None:
        """The merged plain model, streamed into sharded safetensors (``rosa_ds.ds.export``);
        never a non-finite one (checked on the merged weights W_f + A B themselves)."""
        final, module = self.out / "final_model", self.engine.module
        shard = parse_size(self.cfg.max_shard_size)
        self.engine.settle()  # no parameter gathered or in flight from the last evaluation
        try:
            if self.cfg.method == "lora":
                save_model(module, final, self.tokenizer, shard, transform=lora_transform(module),
                           is_unit=is_lora_layer, describe=module.get_base_model())
            else:
                save_model(module, final, self.tokenizer, shard)
        except NonFiniteExport as exc:
            raise Diverged(f"{exc}; {self.last_good()}; lower --lr") from None
        log_rank0(f"final merged model: {final}")

    def run(self) -> None:
        self.stop.install()
        try:
            self.check()
            self.setup()
            self.train()
            write_run_report(self)  # before export: the census reads the live engine
            self.export()
            self.record_peak_rss()
            shutdown_distributed()
        finally:
            self.lock.release()
            self.stop.uninstall()

    def record_peak_rss(self) -> None:
        """Every rank's peak memory over the whole run (a ``memory`` event) beside the preflight's
        prediction: on the CPU the peak resident memory (the figure ``--max-memory`` bounds); on a
        GPU the device's whole-run peak allocated / reserved bytes (the prediction is of device
        memory), the host RSS recorded apart."""
        device_peaks = run_peak_bytes()
        peaks = self._gather([peak_rss_bytes()])
        rec = {"event": "memory", "peak_rss_bytes": peaks, "predicted_peak_bytes": self.fit.need,
               "predicted_phase": self.fit.phase, "available_bytes": self.fit.available}
        if device_peaks:
            rec = {**rec, "compared": "device", **{k: self._gather([v]) for k, v in device_peaks.items()}}
        self.metrics.write(rec)
        measured = rec.get("device_peak_allocated_bytes", peaks)
        log_rank0(f"peak {'device memory' if device_peaks else 'RSS'} per rank: "
                  f"{', '.join(format_size(p) for p in measured)} (predicted {format_size(self.fit.need)} "
                  f"at {self.fit.phase})")


def grad_norm_record(norm: Optional[float], ds_config: dict) -> dict:
    """The step's gradient norm before clipping and whether clipping scaled it down (DeepSpeed
    clips to ``gradient_clipping`` when the norm exceeds it; 0 turns clipping off)."""
    clip = float(ds_config.get("gradient_clipping") or 0.0)
    return {"grad_norm": norm, "clipped": bool(norm is not None and clip > 0 and norm > clip)}


def _bnb_factory(kwargs: dict):
    def make(params):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)

    return make


def frozen_bytes(checkpoint: Path) -> int:
    """Bytes of the frozen record a checkpoint names (shared by its resample cycle's checkpoints)."""
    record = checkpoint.parent / "frozen" / json.loads((checkpoint / "rosa_state.json").read_text())["frozen"]
    return sum(f.stat().st_size for f in record.rglob("*") if f.is_file())


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of its own address space (``ru_maxrss`` keeps
    the high-water mark across exec, so a rank forked from a large parent would report the parent)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def to_device(batch: dict, device) -> dict:
    """A host batch's tensors on the engine's device (the loader does not pin its batches: a
    plain, synchronous copy)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_output_dir(out: Path) -> None:
    """--output-dir is (or can become) a directory this process can write: checked by writing."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory; choose a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--output-dir {out} is not writable ({exc.strerror or exc}); choose a writable "
                          "directory") from None
