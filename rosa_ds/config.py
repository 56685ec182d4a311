"""ROSA method configuration: what to adapt, at which rank, with which subspace strategy.

Validated at construction so that a bad value fails before any model is touched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

STRATEGIES = ("random", "smallest", "largest")
INITS = ("svd", "lora")
SOLVERS = ("gram", "svd")  # kept equal to rosa_ds.factorize.SOLVERS (a test checks)
QUANTIZE_BASE = ("nf4", "int8")  # kept equal to rosa_ds.quant.QUANT_TYPES (a test checks)

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
            or one regex string matched (``re.fullmatch``) against the full module name.
            ``None`` means the defaults for GPT-2, Llama-style and BERT-style models.
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
        solver: how the singular directions are computed: ``gram`` (default: eigenvectors of the
            k x k Gram matrix, its small-singular-value tail refined in fp64; ~2x faster on CPU)
            or ``svd`` (``torch.linalg.svd``). Either way W_f + A B = W exactly
            (see ``rosa_ds.factorize``).
    """

    rank: int = 8
    target_modules: Optional[Union[Sequence[str], str]] = None
    strategy: str = "random"
    seed: int = 0
    modules_to_save: Sequence[str] = field(default_factory=tuple)
    init: str = "svd"
    quantize_base: Optional[str] = None
    solver: str = "gram"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"RosaConfig.rank must be a positive integer, got {self.rank!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"RosaConfig.strategy {self.strategy!r} does not exist; choose one of {', '.join(STRATEGIES)}"
            )
        if self.init not in INITS:
            raise ValueError(f"RosaConfig.init {self.init!r} does not exist; choose one of {', '.join(INITS)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"RosaConfig.solver {self.solver!r} does not exist; choose one of {', '.join(SOLVERS)}")
        if self.quantize_base is not None and self.quantize_base not in QUANTIZE_BASE:
            raise ValueError(f"RosaConfig.quantize_base {self.quantize_base!r} does not exist; choose one of "
                             f"{', '.join(QUANTIZE_BASE)} or None (no quantization)")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"RosaConfig.target_modules is not a valid regex: {exc}") from None
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules:
                raise ValueError("RosaConfig.target_modules is empty; give names, a regex, or None for defaults")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save)

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
        }
