"""How the Trainer path says a config field in an error message: as the ``TrainingArguments``
argument that sets it, where one does, else as the field's own name (a ``RosaConfig`` or
``ScheduleConfig`` field the user passes as is). ``prepare_for_trainer`` makes ``trainer_words``
the process's way of saying fields (``rosa_ds.errors``): a Trainer user meets rosa_ds's errors as
tracebacks out of ``Trainer.__init__`` or ``train``, so there is no print to render them at.
"""
from __future__ import annotations

# rosa_ds's run settings -> the TrainingArguments that set them in a Trainer run.
TRAINING_ARGUMENTS = {
    "micro_batch": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
    "lr": "learning_rate", "weight_decay": "weight_decay", "warmup_steps": "warmup_steps",
    "total_steps": "max_steps", "resume": "resume_from_checkpoint", "output_dir": "output_dir",
    "precision": "bf16/fp16",
}


def trainer_words(name: str) -> str:
    """``micro_batch`` -> ``per_device_train_batch_size``; a field without one keeps its name."""
    return TRAINING_ARGUMENTS.get(name, name)
