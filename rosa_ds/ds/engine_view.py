"""The parts of a live DeepSpeed engine a resample reads, for code that holds the engine's module
and optimizer but not the engine itself: a ``transformers`` callback is handed the model and
accelerate's optimizer wrapper, never ``trainer.deepspeed``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from torch import nn


def zero_optimizer(optimizer):
    """DeepSpeed's ZeRO optimizer under accelerate's ``DeepSpeedOptimizerWrapper``, else None."""
    from accelerate.utils import DeepSpeedOptimizerWrapper

    return optimizer.optimizer if isinstance(optimizer, DeepSpeedOptimizerWrapper) else None


class EngineView:
    """What ``resample_engine``, ``settle`` and the optimizer checks call on an engine, answered
    from the module, the ZeRO optimizer, the stage of the DeepSpeed config and the step count."""

    def __init__(self, module: nn.Module, optimizer, stage: int, global_steps: Callable[[], int]) -> None:
        self.module, self.optimizer, self.stage, self._steps = module, optimizer, stage, global_steps

    @property
    def global_steps(self) -> int:
        return int(self._steps())

    def zero_optimization_stage(self) -> int:
        return self.stage

    def empty_partition_cache(self) -> None:
        # what DeepSpeedEngine.empty_partition_cache does, less its gc/cache flush (not needed for
        # correctness: it only returns memory sooner)
        if hasattr(self.optimizer, "empty_partition_cache"):
            self.optimizer.empty_partition_cache()

    def was_step_applied(self) -> bool:
        """False after an fp16 overflow skipped the update (the ZeRO optimizer's ``overflow``)."""
        return not bool(getattr(self.optimizer, "overflow", False))


def engine_view(module: nn.Module, optimizer, ds_config: Optional[dict],
                global_steps: Callable[[], int]) -> Optional[EngineView]:
    """An ``EngineView`` if ``optimizer`` is accelerate's wrapper of a DeepSpeed optimizer, else None."""
    inner = zero_optimizer(optimizer)
    if inner is None:
        return None
    stage = int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))
    return EngineView(module, inner, stage, global_steps)
