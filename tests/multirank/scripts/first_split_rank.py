"""One rank: a tiny GPT-2 through rosa_ds.initialize; the first factorization's split error
||W_f + A B - W_0|| / ||W_0|| per layer as the fp32 masters hold W_f, A and B (JSON)."""
import argparse
import json

import rosa_ds
from bench.gpu.pair_rank import split_errors
from rosa_ds import RosaConfig
from rosa_ds.ds.dist import shutdown_distributed
from rosa_ds.inject import find_targets
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config, no_dropout_gpt2

p = argparse.ArgumentParser()
p.add_argument("--stage", type=int, default=2)
p.add_argument("--dtype", default="bf16")
p.add_argument("--result", required=True)
a = p.parse_args()
config = RosaConfig(rank=3, seed=7)
w0 = {n: m.weight.detach().double().clone() for n, m in find_targets(no_dropout_gpt2(), config)}
engine = rosa_ds.initialize(no_dropout_gpt2(), config, config=ds_test_config(a.stage, a.dtype))
with open(a.result, "w") as f:
    json.dump({"split_errors": split_errors(engine, w0)}, f)
shutdown_distributed()
exit_now(0)
