"""Test tooling (not shipped with rosa_ds): real multi-rank launches (``launch``), tiny models,
batches and the single-process reference (``models``), tiny on-disk models, tokenizers and
datasets (``assets``)."""
