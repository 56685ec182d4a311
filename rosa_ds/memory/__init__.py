"""The memory accountant's pure side: predicted per-rank bytes (arithmetic on parameter counts),
reports and the planning CLI (``python -m rosa_ds.memory`` plans a model from its config on the
meta device). The census of a live engine is the seam's (``rosa_ds.ds.census``). See docs/memory.md."""
from .counts import ArchInfo, ModelCounts, counts_for, counts_from_config, counts_from_module, load_config, meta_model
from .plan import CATEGORIES, TRANSIENT, MemoryBreakdown, MemoryPlan
from .predict import (
                      activation_bytes,
                      coefficients,
                      exact_reduction,
                      model_reduction,
                      paper_reduction,
                      predict,
                      reduction_vs_full,
                      rho_of,
)
from .report import CompareRow, bar_chart, breakdown_markdown, compare, compare_markdown, write_memory_report

__all__ = [
    "MemoryPlan", "MemoryBreakdown", "CATEGORIES", "TRANSIENT", "ModelCounts", "ArchInfo", "counts_from_module",
    "counts_from_config", "counts_for", "load_config", "meta_model", "predict", "coefficients", "exact_reduction",
    "model_reduction",
    "paper_reduction", "reduction_vs_full", "rho_of", "activation_bytes", "compare", "CompareRow",
    "compare_markdown", "breakdown_markdown", "bar_chart", "write_memory_report",
]
