"""rosa_ds: ROSA (Random Subspace Adaptation) fine-tuning on DeepSpeed ZeRO.

Layers, each importing only those before it:

    rosa_ds            the pure method (config, factorize, layer, inject, schedule, quant): PyTorch only
    rosa_ds.utils      cross-cutting helpers (atomic files, rank/world, packages, logging, typed options)
    rosa_ds.memory     the memory planner: predicted bytes from parameter counts (pure arithmetic)
    rosa_ds.ds         the DeepSpeed seam: the only package that imports deepspeed
    rosa_ds.recipe     the trainer behind launch/train.py (config/CLI, models, data, loop, metrics)
    rosa_ds.hf         the Hugging Face Trainer integration (RosaTrainer), on the seam; nothing imports it

``initialize`` loads the seam lazily, so ``import rosa_ds`` does not import DeepSpeed.
"""
from .config import RosaConfig
from .inject import apply_rosa, iter_rosa_layers, merge_and_unload, merged_state_dict, resample, trainable_report
from .layer import RosaLinear

__version__ = "0.1.0"

__all__ = [
    "RosaConfig", "RosaLinear", "apply_rosa", "resample", "merge_and_unload", "merged_state_dict",
    "trainable_report", "iter_rosa_layers", "initialize", "build_ds_config",
]


def initialize(*args, **kwargs):
    """Build a ROSA DeepSpeed engine; see ``rosa_ds.ds.engine.initialize``."""
    from .ds.engine import initialize as _initialize

    return _initialize(*args, **kwargs)


def build_ds_config(*args, **kwargs):
    """Fill a DeepSpeed JSON template; see ``rosa_ds.ds.config.build_ds_config``."""
    from .ds.config import build_ds_config as _build

    return _build(*args, **kwargs)
