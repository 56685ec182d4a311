"""The training recipe behind ``launch/train.py``: ``run(cfg)`` = check -> build -> train ->
report -> export.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json      # N ranks (DeepSpeed launcher)
    python launch/train.py                                           # one process

``spec.check`` decides everything about the run before any weight loads (a frozen ``RunSpec``);
``build.build`` loads the model and starts the engine; the ``Trainer`` runs the loop and composes
the parts that each have one job: the ``Evaluator`` (held-out scores), the ``Checkpointer`` (saves,
resume, pruning), the ``DivergenceGuard`` (``--nan-policy``) and the metrics sink
(``MetricsWriter``: metrics.jsonl on rank 0).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..ds import config as dsconfig
from ..ds.dist import PeakMemory, all_reduce, run_peak_bytes, shutdown_distributed, synchronize
from ..ds.export import NonFiniteExport, save_model
from ..errors import ConfigError
from ..inject import trainable_report
from ..memory.activations import census
from ..utils.dist import rank_and_world
from ..utils.log import log_rank0
from ..utils.sizes import format_size, parse_size
from .build import build
from .checkpointer import Checkpointer
from .config import TrainConfig, save_resolved
from .data import PackCollator, PadCollator, batch_tokens
from .evaluate import Evaluator, gather, to_device
from .faults import Diverged, OutputLock, Preempted, StopRequest
from .guard import DivergenceGuard
from .memory_report import write_run_report
from .metrics import MetricsWriter, eval_postfix, progress
from .spec import RunSpec, check


def run(cfg: TrainConfig, stop: Optional[StopRequest] = None) -> None:
    """One training run, start to finish; every bad input fails in ``check``, before weights load."""
    stop = (stop or StopRequest()).install()
    out = Path(cfg.output_dir)
    lock = OutputLock(out)
    rank, world = rank_and_world()
    try:
        check_output_dir(out)
        if rank == 0:
            lock.acquire()  # one run per --output-dir
        spec = check(cfg, rank, world)
        trainer = Trainer(spec, *build(spec), stop)
        trainer.train()
        # before export: the census reads the live engine
        write_run_report(spec, trainer.engine, trainer.step_peak, trainer.activations)
        trainer.export()
        trainer.record_peak_rss()
        shutdown_distributed()
    finally:
        lock.release()
        stop.uninstall()


class Trainer:
    """The loop over a built engine; ``spec`` is the checked run, ``ds_config`` the DeepSpeed config
    the engine was given. Writes the resolved config, resumes if ``spec.resume`` says so."""

    def __init__(self, spec: RunSpec, engine, ds_config: dict, stop: Optional[StopRequest] = None) -> None:
        self.spec, self.cfg, self.engine, self.ds_config = spec, spec.cfg, engine, ds_config
        self.rank, self.world = spec.rank, spec.world
        self.stop = stop or StopRequest()  # SIGTERM/SIGINT -> checkpoint after the current step (``faults``)
        self.metrics = MetricsWriter(spec.out / "metrics.jsonl", enabled=spec.rank == 0)
        self.evaluator = Evaluator(spec, engine, self.metrics)
        self.checkpoints = Checkpointer(spec, engine, self.metrics)
        self.guard = DivergenceGuard(self.cfg.nan_policy, self.cfg.nan_skip_limit, dsconfig.precision(ds_config),
                                     lambda: getattr(engine.ds, "skipped_steps", 0), self.checkpoints.last_good)
        self.collate = PadCollator(spec.tokenizer.pad_token_id)
        self.train_collate = PackCollator(spec.tokenizer.pad_token_id) if self.cfg.data.pack else self.collate
        self.step_peak = 0  # accelerator peak bytes over training steps (GPU only; see PeakMemory)
        self.activations: Optional[dict] = None  # census of the first micro step (memory report)
        self.start_epoch, self.skip = 0, 0
        if spec.rank == 0:
            spec.out.mkdir(parents=True, exist_ok=True)
            save_resolved(self.cfg, spec.out / "config.json", ds_config)
            log_rank0(spec.method.describe(trainable_report(engine.module)))
        if spec.resume is not None:
            self.start_epoch, self.skip = self.checkpoints.resume()

    def loader(self, epoch: int, skip: int):
        batches = self.spec.steps.order.micro_batches(epoch, skip_batches=skip)
        return torch.utils.data.DataLoader(self.spec.train_set, batch_sampler=batches, collate_fn=self.train_collate)

    def train(self) -> None:
        cfg, eng, total, per_epoch = self.cfg, self.engine, self.spec.total_steps, self.spec.steps.order.steps_per_epoch
        evaluate, save = self.evaluator.evaluate, self.checkpoints.save
        if eng.global_step == 0:
            evaluate(0)  # the starting point: the pretrained model (ROSA's W_f + A B = W)
        self.stop.begin_training()
        bar = progress(total, initial=eng.global_step, enabled=self.rank == 0)
        for epoch in range(self.start_epoch, cfg.epochs):
            skip, self.skip = self.skip, 0
            done_in_epoch = skip
            tokens, losses, t0 = 0, [], time.perf_counter()
            for batch in self.loader(epoch, skip):
                if eng.global_step >= total:
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
                                **eval_postfix(self.evaluator.last))
                tokens, losses, t0 = 0, [], time.perf_counter()
                if event:
                    self.metrics.write(event)
                if stop:  # every rank agreed in log_step's all-reduce: stop after this step
                    self.preempt(epoch, done_in_epoch)
                if cfg.eval_every and eng.global_step % cfg.eval_every == 0:
                    evaluate(epoch)
                last = done_in_epoch >= per_epoch or eng.global_step >= total
                if cfg.save_every and eng.global_step % cfg.save_every == 0 and not last:  # last: saved below
                    save(epoch, done_in_epoch)
            finished = done_in_epoch >= per_epoch
            if finished:
                event = eng.end_epoch(epoch, cfg.epochs)
                if event:
                    self.metrics.write(event)
            if not cfg.eval_every:
                evaluate(epoch + 1 if finished else epoch)
            # not twice at --max-steps = a --save-every step
            if self.checkpoints.saved_step != eng.global_step or finished:
                save(epoch + 1, 0) if finished else save(epoch, done_in_epoch)
            if eng.global_step >= total:
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
        diverged = self.guard.check(rec)
        self.metrics.write(rec)
        if diverged is not None:
            raise diverged
        return rec, stops > 0

    def preempt(self, epoch: int, batches_in_epoch: int) -> None:
        """Checkpoint at the current step (unless it was just saved) and stop (exit 75)."""
        if self.checkpoints.saved_step != self.engine.global_step:
            self.checkpoints.save(epoch, batches_in_epoch)
        self.stop.saved = True
        reasons = gather([self.stop.reason] if self.stop.reason else [])  # the rank that saw it says why
        reason = reasons[0] if reasons else "a stop request"
        self.metrics.write({"event": "preempted", "step": self.engine.global_step, "reason": reason,
                            "checkpoint": str(self.checkpoints.last)})
        raise Preempted(f"stopped ({reason}) after step {self.engine.global_step}: checkpoint "
                        f"{self.checkpoints.last} saved; continue with --resume")

    def export(self) -> None:
        """The merged plain model, streamed into sharded safetensors (``rosa_ds.ds.export``);
        never a non-finite one (checked on the merged weights W_f + A B themselves)."""
        final, module = self.spec.out / "final_model", self.engine.module
        self.engine.settle()  # no parameter gathered or in flight from the last evaluation
        try:
            save_model(module, final, self.spec.tokenizer, parse_size(self.cfg.max_shard_size),
                       **self.spec.method.save_kwargs(module))
        except NonFiniteExport as exc:
            raise Diverged(f"{exc}; {self.checkpoints.last_good()}; lower --lr") from None
        log_rank0(f"final merged model: {final}")

    def record_peak_rss(self) -> None:
        """Every rank's peak memory over the whole run (a ``memory`` event) beside the preflight's
        prediction: on the CPU the peak resident memory (the figure ``--max-memory`` bounds); on a
        GPU the device's whole-run peak allocated / reserved bytes (the prediction is of device
        memory), the host RSS recorded apart."""
        device_peaks = run_peak_bytes()
        fit = self.spec.fit
        peaks = gather([peak_rss_bytes()])
        rec = {"event": "memory", "peak_rss_bytes": peaks, "predicted_peak_bytes": fit.need,
               "predicted_phase": fit.phase, "available_bytes": fit.available}
        if device_peaks:
            rec = {**rec, "compared": "device", **{k: gather([v]) for k, v in device_peaks.items()}}
        self.metrics.write(rec)
        measured = rec.get("device_peak_allocated_bytes", peaks)
        log_rank0(f"peak {'device memory' if device_peaks else 'RSS'} per rank: "
                  f"{', '.join(format_size(p) for p in measured)} (predicted {format_size(fit.need)} "
                  f"at {fit.phase})")


def grad_norm_record(norm: Optional[float], ds_config: dict) -> dict:
    """The step's gradient norm before clipping and whether clipping scaled it down (DeepSpeed
    clips to ``gradient_clipping`` when the norm exceeds it; 0 turns clipping off)."""
    clip = float(ds_config.get("gradient_clipping") or 0.0)
    return {"grad_norm": norm, "clipped": bool(norm is not None and clip > 0 and norm > clip)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of its own address space (``ru_maxrss`` keeps
    the high-water mark across exec, so a rank forked from a large parent would report the parent)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
