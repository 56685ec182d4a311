"""Data for rosa_ds: records -> validated, split examples -> cached token ids -> padded batches.

    cfg = DataConfig(task="causal_lm", dataset="bbc-headlines", seq_len=256)
    raw = check_data(cfg)                 # cheap; bad data fails here, before any model loads
    data = tokenize_data(raw, tokenizer)  # TokenizedData(train, eval, label_names, eval_prompts, ...)
    order = BatchOrder(len(data.train), micro_batch=8, world_size=ws, rank=r, grad_accum=1, seed=seed)
    loader = DataLoader(data.train, batch_sampler=order.micro_batches(epoch, skip_batches=k),
                        collate_fn=PadCollator(tokenizer.pad_token_id))
"""
from .collate import PadCollator, batch_tokens
from .config import BUILTINS, DataConfig, DataError
from .encode import IGNORE_INDEX, EvalPrompt, TokenizedSplit
from .order import BatchOrder
from .pack import PackCollator, PackedSplit
from .pipeline import TokenizedData, load_data, tokenize_data, tokenizer_fingerprint
from .prepare import RawData, check_data

__all__ = [
    "DataConfig", "DataError", "BUILTINS", "check_data", "tokenize_data", "load_data", "RawData",
    "TokenizedData", "TokenizedSplit", "EvalPrompt", "PadCollator", "BatchOrder", "IGNORE_INDEX",
    "tokenizer_fingerprint", "PackedSplit", "PackCollator", "batch_tokens",
]
