"""One rank: a tiny GPT-2 built partitioned in bf16 (ZeRO-3), ROSA applied with a quantized base
(``prepare_model``: the partitioned path); writes each quantized base's scale dtype and whether the
scales equal those of the fp32 master quantized outside DeepSpeed (JSON)."""
import argparse
import json

import torch

from rosa_ds import RosaConfig
from rosa_ds.ds.dist import init_distributed, shutdown_distributed
from rosa_ds.ds.prepare import prepare_model
from rosa_ds.ds.zero_init import ZeroInit
from rosa_ds.inject import iter_rosa_layers
from rosa_ds.quant import quantize
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config, no_dropout_gpt2

p = argparse.ArgumentParser()
p.add_argument("--kind", default="nf4")
p.add_argument("--result", required=True)
a = p.parse_args()
import torch._dynamo  # noqa: E402,F401  (its import fails inside zero.Init, which patches Tensor.__new__)

init_distributed()
ds_config = ds_test_config(3, "bf16")
with ZeroInit(config_dict_or_path=ds_config, dtype=torch.bfloat16):
    model = no_dropout_gpt2()
prepare_model(model, RosaConfig(rank=2, seed=7, quantize_base=a.kind), ds_config)
rows = []
for _, layer in iter_rosa_layers(model):
    scale = quantize(layer.base_master, a.kind)[1]
    rows.append({"dtype": str(layer.base_layer.qscale.dtype),
                 "scales_exact": bool(torch.equal(layer.base_layer.qscale.float(), scale))})
with open(a.result, "w") as f:
    json.dump({"layers": rows}, f)
shutdown_distributed()
exit_now(0)
