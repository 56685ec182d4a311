"""rosa_ds: ROSA (Random Subspace Adaptation) fine-tuning on DeepSpeed ZeRO.

The method (config, factorize, layer, inject, schedule, memory prediction) is pure PyTorch;
``rosa_ds.zero`` is the only module that imports DeepSpeed, loaded lazily by ``initialize``.
"""
from .config import RosaConfig
from .inject import apply_rosa, iter_rosa_layers, merge_and_unload, merged_state_dict, resample, trainable_report
from .layer import RosaLinear

__version__ = "0.1.0"

__all__ = [
    "RosaConfig", "RosaLinear", "apply_rosa", "resample", "merge_and_unload", "merged_state_dict",
    "trainable_report", "iter_rosa_layers", "initialize",
]


def initialize(*args, **kwargs):
    """Build a ROSA DeepSpeed engine; see ``rosa_ds.engine.initialize``."""
    from .engine import initialize as _initialize

    return _initialize(*args, **kwargs)
