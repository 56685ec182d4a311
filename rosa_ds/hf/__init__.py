"""ROSA inside the Hugging Face ``transformers.Trainer`` (and Trainer subclasses such as TRL's).

    from rosa_ds.hf import RosaTrainer
    trainer = RosaTrainer(model=model, args=args, train_dataset=ds, rosa_config=RosaConfig(rank=8))

``RosaTrainer`` is ``Trainer`` with ROSA: applied before the Trainer builds DeepSpeed, the factors
in optimizer param groups of their own, resamples on a ``ScheduleConfig`` through the seam the
engine uses, ROSA state in every Trainer checkpoint, and ``save_model`` writing the merged plain
model. For another Trainer class, ``with_rosa(SFTTrainer)`` (or ``RosaTrainerMixin`` first in the
bases) gives the same, and takes TRL's ``peft_config=RosaConfig(...)`` and ``model="<path>"`` too.
``RosaCallback(rosa_config, schedule)`` alone adds ROSA to any Trainer (no checkpointed ROSA state,
no trainable head). This layer may import ``rosa_ds.ds`` and transformers; nothing below it
imports this package.
"""
from ..ds.dist import adopt_process_group, skip_cpu_shm_build
from .callback import RosaCallback
from .checks import RosaTrainerError
from .setup import load_model
from .trainer import RosaTrainer, RosaTrainerMixin, with_rosa

# TrainingArguments start the process group (accelerate -> deepspeed.init_distributed) before any
# RosaTrainer exists; on a CPU that would first compile DeepSpeed's shm op (minutes), as
# rosa_ds.ds.dist.init_distributed explains, so the switch is set when this package is imported
skip_cpu_shm_build()

__all__ = ["adopt_process_group", "RosaTrainer", "RosaTrainerMixin", "RosaCallback", "RosaTrainerError", "load_model",
           "with_rosa"]
