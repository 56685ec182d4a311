"""When to resample, and the optional learning-rate re-warmup after a resample. No tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .utils.options import OptionError, check_options, opt


@dataclass
class ScheduleConfig:
    """Resampling schedule.

    Attributes:
        resample_every: ``"epoch"`` (the paper: at every epoch boundary, except after the last),
            ``"never"`` (ROSA with one fixed subspace, i.e. SVD-initialised LoRA), or a positive
            integer N: after every N optimizer steps.
        rewarmup_steps: K > 0 scales the learning rate by (s+1)/K for the K optimizer steps after
            each resample (ReLoRA's "jagged" schedule); 0 keeps the schedule continuous.
        restart_schedule: after each resample the learning rate follows the run's warmup-decay
            schedule again from its start (same warmup and total steps), as the ROSA paper's code
            does by building a new optimizer and scheduler per subspace; False keeps one schedule.
    """

    resample_every: Union[str, int] = opt(
        "epoch", "ROSA: merge and redraw the subspace every 'epoch', 'never', or N optimizer steps")
    rewarmup_steps: int = opt(
        0, "ROSA: K optimizer steps of LR re-warmup after each resample (0 = continuous schedule)", minimum=0)
    restart_schedule: bool = opt(
        False, "ROSA: restart the warmup-decay LR schedule from its start at each resample (the paper's code)")

    def __post_init__(self) -> None:
        every = self.resample_every
        if isinstance(every, str) and every.strip().isdigit():
            every = int(every)
        if isinstance(every, bool) or not (every in ("epoch", "never") or (isinstance(every, int) and every > 0)):
            raise OptionError("ScheduleConfig", "resample_every", f"{every!r} is not valid; fix: use "
                                                                  "epoch, never, or a positive number of steps")
        self.resample_every = every
        check_options(self)

    def due_after_step(self, global_step: int, total_steps: Optional[int] = None, done: Optional[int] = None) -> bool:
        """True if a resample follows optimizer step ``global_step`` (1-based count of steps done).
        With ``total_steps`` (the run's optimizer steps) never after the final one: a resample
        there only merges, which the export does anyway, at the cost of one SVD per layer. ``done``
        is the run's step count when ``global_step`` counts something else (applied steps)."""
        return (isinstance(self.resample_every, int) and global_step > 0 and global_step % self.resample_every == 0
                and not finished(global_step if done is None else done, total_steps))

    def due_at_epoch_end(self, epoch: int, num_epochs: int, done: Optional[int] = None,
                         total_steps: Optional[int] = None) -> bool:
        """True at the end of epoch ``epoch`` (0-based) unless it is the last, or the run's
        ``total_steps`` are ``done`` (a step limit that ends at an epoch boundary): a final
        resample would only merge, which the export does anyway."""
        return self.resample_every == "epoch" and epoch + 1 < num_epochs and not finished(done, total_steps)

    def lr_factor(self, steps_since_resample: int | None, base: tuple[int, int, int] | None = None) -> float:
        """Multiplier for the scheduled learning rate at the next optimizer step.

        ``steps_since_resample`` counts optimizer steps taken since the last resample (None if
        none happened yet; the base schedule's own warmup covers the start of training).
        ``base`` = (scheduler iteration now, warmup steps, total steps) of the run's warmup-decay
        schedule; with ``restart_schedule`` the factor is warmup_decay(s − 1) / warmup_decay(now),
        the rate a scheduler restarted at the last resample would give (1.0 where the current
        rate is 0: the final step, nothing to rescale).
        """
        factor = 1.0
        if self.rewarmup_steps and steps_since_resample is not None and steps_since_resample < self.rewarmup_steps:
            factor = (steps_since_resample + 1) / self.rewarmup_steps
        if self.restart_schedule and steps_since_resample is not None and base is not None:
            now, warmup, total = base
            current = warmup_decay(now, warmup, total)
            if current > 0:
                factor *= warmup_decay(steps_since_resample - 1, warmup, total) / current
        return factor


def warmup_decay(iteration: int, warmup: int, total: int) -> float:
    """DeepSpeed's ``WarmupDecayLR`` multiplier (linear warmup) at scheduler ``iteration``:
    0 before the first step (iteration −1), iteration / warmup during warmup, then a linear decay
    (total − iteration) / (total − warmup) to 0 at ``total``. The optimizer step that follows
    ``k`` applied steps uses iteration k − 1 (DeepSpeed steps the scheduler after the optimizer)."""
    if iteration < 0:
        return 0.0
    if iteration < warmup:
        return iteration / warmup
    return max(0.0, (total - iteration) / max(1.0, total - warmup))


def finished(done: Optional[int], total_steps: Optional[int]) -> bool:
    """True once ``done`` optimizer steps reach the run's ``total_steps`` (unknown: never). The one
    rule the CLI trainer (``RosaEngine.total_steps``) and the Trainer callback
    (``TrainerState.max_steps``) share, so neither resamples after the final step."""
    return done is not None and total_steps is not None and total_steps > 0 and done >= total_steps
