"""ROSA method configuration: what to adapt, at which rank, with which subspace strategy.

Validated at construction so that a bad value fails before any model is touched. Each field
carries its one-line help: the training CLI derives its flags from them (``--rank``,
``--target-modules`` ...), so a new ROSA option is one field here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .factorize import FACTOR_SCALES, SOLVERS, STRATEGIES
from .quant import QUANT_TYPES
from .utils.options import OptionError, check_options, opt
from .utils.packages import is_installed

INITS = ("svd", "lora")
REGEX_PREFIX = "re:"  # a target list of one "re:<regex>" is a regex on full module names

# Leaf names of the projection layers in the architectures users bring most often.
# GPT-2 (transformers Conv1D), Llama/Mistral/Qwen-style, BERT/RoBERTa-style.
DEFAULT_TARGETS = (
    "c_attn", "c_proj", "c_fc",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "query", "key", "value", "dense",
)


@dataclass
class RosaConfig:
    """Configuration of the ROSA method (pure PyTorch side; no DeepSpeed here).

    Attributes:
        rank: R, the number of singular triplets made trainable per adapted matrix.
        target_modules: leaf names (matched against the last component of a module's name),
            or one regex string matched (``re.fullmatch``) against the full module name (also
            given as a one-element list ``["re:<regex>"]``). ``None`` means the defaults for
            GPT-2, Llama-style and BERT-style models.
        strategy: which singular triplets become the trainable factors: ``random`` (the
            paper's default), ``smallest`` or ``largest`` singular values.
        seed: base seed; every (resample index, layer index) draws from a seed derived from it,
            so all ranks agree on the subspace without communicating.
        modules_to_save: leaf names or dotted suffixes of modules kept fully trainable and never
            adapted (e.g. a classification head ``classifier`` / ``score``).
        init: ``svd`` (ROSA: factors from singular triplets) or ``lora`` (ablation: A random,
            B zero, W_f = W; no SVD).
        quantize_base: ``None`` (W_f in the model's dtype), ``"nf4"`` or ``"int8"``: W_f stored
            quantized with bitsandbytes' nf4 / LLM.int8() row-wise scheme (1/7 or 1/4 of fp32 bytes
            on the accelerator) and an fp32 master of W_f in host RAM that every merge updates and
            re-quantizes from, so resamples never accumulate quantization error.
        solver: how the singular directions are computed: ``band`` (default: a two-stage reduction
            of the k x k Gram matrix to a band and only the R drawn eigenpairs, in fp64 when a draw
            lies in the small-singular-value tail; on CPU tensors with k >= 2048, elsewhere it is
            ``tridiag``), ``tridiag`` (one tridiagonal reduction and the R drawn eigenpairs, on CPU
            tensors; elsewhere it is ``gram``), ``gram`` (all eigenvectors of the Gram matrix),
            both with the tail refined in fp64, or ``svd`` (``torch.linalg.svd``). Either way
            W_f + A B = W exactly (see ``rosa_ds.factorize``).
        factor_scale: how each drawn singular value s_i is split between the factors: ``sqrt``
            (A_i = u_i sqrt(s_i), B_i = sqrt(s_i) v_i^T, the paper's) or ``uniform`` (A_i = u_i c,
            B_i = (s_i / c) v_i^T, c^2 the mean drawn s_i: a small-s_i direction moves as fast
            under a given learning rate as an average one). The product A B, hence the model, is the
            same; only the training dynamics differ (``rosa_ds.factorize``).
        frozen_master: keep an fp32 master of a bf16 / fp16 W_f in host RAM, which every merge
            reads and writes, so that W_f is rounded once from it instead of re-rounded at every
            resample (under DeepSpeed only the layer's owner rank keeps it: 4 bytes per adapted
            weight / N ranks). ``None``: on when W_f is stored in bf16 / fp16 (decided by
            ``apply_rosa`` from the weights' dtype, by ``rosa_ds.initialize`` from the DeepSpeed
            config's precision). A quantized base always keeps its master.
    """

    rank: int = opt(8, "ROSA/LoRA rank R: trainable singular triplets per adapted matrix", minimum=1)
    target_modules: Optional[Union[tuple, str]] = opt(
        None, "leaf names of the layers to adapt, or one 're:<regex>' on full names; none = per-architecture defaults",
        nargs="+")
    strategy: str = opt("random", "ROSA: which singular triplets are trainable", STRATEGIES)
    seed: int = opt(0, "base seed of the subspace draws (the recipe sets it from its own seed)", flag=False)
    modules_to_save: tuple = opt(
        default_factory=tuple, help="modules kept fully trainable (e.g. classifier); none = the classification "
        "head for classification", nargs="+")
    init: str = opt("svd", "ROSA: svd (factors from singular triplets) or lora (ablation: A random, B zero)", INITS)
    quantize_base: Optional[str] = opt(
        None, "ROSA: store the frozen W_f quantized, nf4 or int8 (bitsandbytes), with an fp32 master in host RAM",
        QUANT_TYPES)
    solver: str = opt("band", "ROSA: singular directions from the Gram matrix's drawn eigenpairs only, by a band "
                      "(fastest) or a tridiagonal reduction, all its eigenvectors, or torch's svd", SOLVERS)
    factor_scale: str = opt("sqrt", "ROSA: split of each singular value between A and B: sqrt (the paper's) or "
                            "uniform (every drawn direction steps like an average one)", FACTOR_SCALES)
    frozen_master: Optional[bool] = opt(
        None, "ROSA: keep an fp32 master of a bf16/fp16 W_f (host RAM, on its owner rank) so merges never re-round "
              "it; default: on when training in bf16/fp16")

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        if isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) == 1 \
                and str(self.target_modules[0]).startswith(REGEX_PREFIX):
            self.target_modules = self.target_modules[0]
        if isinstance(self.target_modules, str) and self.target_modules.startswith(REGEX_PREFIX):
            self.target_modules = self.target_modules[len(REGEX_PREFIX):]
        check_options(self)
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise OptionError("RosaConfig", "target_modules", f"is not a valid regex: {exc}") from None
        elif self.target_modules is not None and not self.target_modules:
            raise OptionError("RosaConfig", "target_modules", "is empty; give layer names, one re:<regex>, or "
                                                              "none for the defaults")
        if self.quantize_base == "nf4" and not is_installed("bitsandbytes"):
            raise OptionError("RosaConfig", "quantize_base", "nf4 needs bitsandbytes; fix: pip install "
                                                             "bitsandbytes or use int8")

    def wants_master(self, dtype: torch.dtype) -> bool:
        """Whether a W_f stored in ``dtype`` gets an fp32 master (see ``frozen_master``)."""
        if self.frozen_master is not None:
            return self.frozen_master
        return dtype in (torch.bfloat16, torch.float16)

    def matches_target(self, name: str) -> bool:
        """True if the module called ``name`` (dotted path) is a ROSA target by name."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        targets = DEFAULT_TARGETS if self.target_modules is None else self.target_modules
        return name.split(".")[-1] in targets

    def is_saved_module(self, name: str) -> bool:
        """True if ``name`` is (inside) a module kept fully trainable."""
        parts = name.split(".")
        for keep in self.modules_to_save:
            k = keep.split(".")
            for i in range(len(parts) - len(k) + 1):
                if parts[i:i + len(k)] == k:
                    return True
        return False

    def to_dict(self) -> dict:
        tm = self.target_modules
        return {
            "rank": self.rank,
            "target_modules": list(tm) if isinstance(tm, tuple) else tm,
            "strategy": self.strategy,
            "seed": self.seed,
            "modules_to_save": list(self.modules_to_save),
            "init": self.init,
            "quantize_base": self.quantize_base,
            "solver": self.solver,
            "factor_scale": self.factor_scale,
            "frozen_master": self.frozen_master,
        }
