"""``RosaTrainer``: ``transformers.Trainer`` with ROSA, under DeepSpeed ZeRO-1/2/3 or plain PyTorch.

What it changes in the Trainer, and where:

* ``__init__``: ROSA is applied (``rosa_ds.ds.prepare.prepare_model``: one SVD per layer in the
  world, fp32 masters of a bf16 W_f on their owners) before the Trainer, and so DeepSpeed, sees
  the model. Under ZeRO-3 create ``TrainingArguments`` before ``from_pretrained`` (the usual
  Trainer rule) so the model is loaded partitioned; ROSA's factors are then created partitioned.
* ``create_optimizer``: the factors get param groups of their own (the Trainer's decay / no-decay
  split would put them in one group with a head's weights, and a reset would wipe the head's
  Adam state). With an optimizer in the DeepSpeed config the Trainer hands DeepSpeed one flat
  list of parameters; it gets ``rosa_ds.ds.engine.param_groups`` instead.
* ``_prepare_for_training``: after the Trainer built (or resumed) the engine, checks that the
  factors' optimizer state can be reset alone, and restores ROSA's state on resume.
* ``_save_checkpoint``: ROSA's state beside every Trainer checkpoint (``run.py``).
* ``save_model``: the merged plain model, loadable with ``from_pretrained``. The Trainer's own
  checkpoint saves (``_internal_call``) keep the ROSA layers without DeepSpeed (resuming loads
  them) and write no weights file under DeepSpeed (its files and the frozen record hold them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import RosaConfig
from ..ds.engine import param_groups
from ..ds.params import write_pending_masters
from ..layer import is_adapter_param
from ..schedule import ScheduleConfig
from .callback import RosaCallback
from .checks import RosaTrainerError, check_training_args
from .run import RosaRun
from .setup import load_model, prepare_for_trainer


def _rosa_from_peft_config(rosa_config: Optional[RosaConfig], kwargs: dict) -> Optional[RosaConfig]:
    """TRL's way to choose an adapter, ``peft_config=``, taking a ``rosa_ds.RosaConfig``; a PEFT
    config (LoraConfig ...) is refused: PEFT would wrap ROSA's layers, which it cannot adapt."""
    peft_config = kwargs.pop("peft_config", None)
    if peft_config is None:
        return rosa_config
    if not isinstance(peft_config, RosaConfig):
        raise RosaTrainerError(f"peft_config={type(peft_config).__name__}(...) cannot be combined with ROSA (PEFT "
                               "would wrap ROSA's layers); pass peft_config=rosa_ds.RosaConfig(rank=...) for ROSA, or "
                               "use the trainer without with_rosa for a PEFT adapter")
    if rosa_config is not None and rosa_config != peft_config:
        raise RosaTrainerError("rosa_config= and peft_config= both given and they differ; pass one RosaConfig")
    return peft_config


class RosaTrainerMixin:
    """Put first in the bases of any ``transformers.Trainer`` subclass (TRL's ``SFTTrainer`` ...).

    Extra keyword arguments: ``rosa_config`` (``RosaConfig``; optional if the model already has
    ROSA layers) and ``schedule`` (``ScheduleConfig``: resample every ``"epoch"`` (default),
    ``"never"`` or N optimizer steps)."""

    def __init__(self, model=None, args=None, *rest, rosa_config: Optional[RosaConfig] = None,
                 schedule: Optional[ScheduleConfig] = None, **kwargs) -> None:
        schedule = schedule or ScheduleConfig()
        if kwargs.get("model_init") is not None:
            raise RosaTrainerError("RosaTrainer does not support model_init (hyperparameter search); pass model=...")
        rosa_config = _rosa_from_peft_config(rosa_config, kwargs)
        check_training_args(args, schedule)  # before a model given by name loads
        model = load_model(model, args)
        rosa_config, _ = prepare_for_trainer(model, args, rosa_config, schedule)
        super().__init__(model, args, *rest, **kwargs)
        self.rosa = RosaRun(self, rosa_config, schedule)
        # first: its log keys reach the loggers
        self.callback_handler.callbacks.insert(0, RosaCallback.bound(self.rosa))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer with the factors in groups of their own (see the module docstring)."""
        from accelerate.utils import DummyOptim

        if isinstance(self.optimizer, DummyOptim):  # the DeepSpeed config's optimizer: DeepSpeed builds it
            self.optimizer.params = param_groups(self.model if model is None else model)
            return self.optimizer
        optimizer = super().create_optimizer(model)
        named = (self.model if model is None else model).named_parameters()
        _split_factor_groups(optimizer, {id(p) for n, p in named if is_adapter_param(n)})
        return optimizer

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self.rosa.check_optimizer()
        # the first factorization's exact A, B; a resume has loaded the checkpoint's masters already
        write_pending_masters(self.rosa.factor_params, write=resume_from_checkpoint is None)
        if resume_from_checkpoint is not None:
            self.rosa.restore(Path(resume_from_checkpoint))
        return model, train_dataloader

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial=trial)
        self.rosa.save(Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _load_best_model(self) -> None:
        super()._load_best_model()  # the factors (and the head); W_f of that checkpoint's cycle next
        self.rosa.restore_weights(Path(self.state.best_model_checkpoint))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The merged plain model (``from_pretrained`` loads it) in ``output_dir`` (default
        ``args.output_dir``), with the processing class. Call on every rank."""
        if _internal_call and self.is_deepspeed_enabled:
            return self._save_checkpoint_config(output_dir)
        if _internal_call:  # without DeepSpeed the weights file is what resuming loads
            return super().save_model(output_dir, _internal_call=True)
        self.rosa.export(Path(output_dir if output_dir is not None else self.args.output_dir),
                         tokenizer=self.processing_class)
        return None


    def _save_checkpoint_config(self, output_dir: str) -> None:
        """A checkpoint's model part under DeepSpeed: config and tokenizer only. Resuming reads the
        weights from DeepSpeed's files and the frozen record; the Trainer's own weights file would
        be a third copy of the frozen weights (ZeRO-3: a second DeepSpeed checkpoint), and with
        ROSA keys not a plain model anyway (``save_model`` writes that)."""
        if not self.args.should_save:
            return
        self.model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)


def _split_factor_groups(optimizer, factor_ids: set[int]) -> None:
    """Move the ROSA factors of every param group into a group of their own with the same
    hyperparameters (before the first step, so no state moves). Idempotent."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return  # check_optimizer names the problem once training starts
    groups = list(optimizer.param_groups)
    if not any({id(p) in factor_ids for p in g["params"]} == {True, False} for g in groups):
        return
    optimizer.param_groups.clear()
    for group in groups:
        factors = [p for p in group["params"] if id(p) in factor_ids]
        others = [p for p in group["params"] if id(p) not in factor_ids]
        if factors:
            optimizer.add_param_group({**group, "params": factors, "name": "rosa_factors"})
        if others:
            optimizer.add_param_group({**group, "params": others})


class RosaTrainer(RosaTrainerMixin, Trainer):
    """``transformers.Trainer`` with ROSA; see ``RosaTrainerMixin`` for the extra arguments."""


def with_rosa(trainer_cls: type) -> type:
    """``trainer_cls`` with ROSA, e.g. ``with_rosa(trl.SFTTrainer)``."""
    return type(f"Rosa{trainer_cls.__name__}", (RosaTrainerMixin, trainer_cls), {})
