"""The DeepSpeed seam: the only package of rosa_ds that imports deepspeed.

    dist        process group, the accelerator device, checked collectives
    params      ZeRO parameter primitives: gather, fp32 masters (read, batched read, write)
    optim       the factors' flat optimizer groups: find, reset, inspect
    resample    the distributed resample (ZeRO-1/2 replicated and ZeRO-3 partitioned paths) and
                ``resample_engine``: one resample of a live engine, state reset included
    prepare     ROSA applied before DeepSpeed is built (``initialize`` and ``rosa_ds.hf`` share it)
    engine      RosaEngine and ``initialize``
    checkpoint  atomic checkpoints with ROSA state, exact resume
    frozen_record  a resample cycle's frozen state, shared by its checkpoints
    write_guard  a save's writes failing together (disk full, I/O errors), per-file digests
    verify      which checkpoint a resume loads: intact files, fallback, compatibility (files only)
    export      the merged plain model
    config      DeepSpeed JSON templates, "auto" filling and the one validator (pure dict logic)
    census      measured bytes of a live engine's tensors (duck-typed)

Submodules are imported on demand, so ``import rosa_ds.ds.config`` does not load DeepSpeed.
"""
