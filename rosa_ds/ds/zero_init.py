"""``deepspeed.zero.Init`` that builds parameters in the dtype it is given.

DeepSpeed 0.19.8's ``Init._set_dtype`` reads, for an explicit ``dtype``,
``dtype or torch.float16 if is_fp16_supported() else torch.bfloat16 if ...``: Python parses it as
``(dtype or fp16) if is_fp16_supported() else bf16``, so on an accelerator without fp16 (the CPU
accelerator on processors where oneDNN has no fp16 kernels) every parameter is built in bf16
whatever dtype was asked for: an fp32 run silently trains and exports a bf16 model, and gloo
rejects the mixed all-gathers. Without a dtype the config's bf16/fp16 flags decide, as in DeepSpeed.
"""
from __future__ import annotations

from typing import Optional

import deepspeed
import torch


class ZeroInit(deepspeed.zero.Init):
    """``zero.Init`` whose explicit ``dtype`` is the dtype of every parameter it builds."""

    def _set_dtype(self, ds_config, dtype: Optional[torch.dtype]) -> None:
        if dtype is None:
            super()._set_dtype(ds_config, dtype)
        else:
            self.dtype = dtype
