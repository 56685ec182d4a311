"""The engine's whole cycle on the CPU stand-in accelerator with device index 1: every seam module
computes on the stand-in's device (one place), and the first factorization, steps, resample,
checkpoint round trip and sharded export run there, as on GPU rank 1."""
from pathlib import Path

from bench.gpu.compare import run_rows
from tests.helpers.launch import launch_ranks

SCRIPT = Path(__file__).parent / "scripts" / "stand_in_rank.py"


def test_resample_checkpoint_and_export_on_the_stand_in_device_1(tmp_path):
    results = launch_ranks(SCRIPT, ["--stand-in-index", "1", "--stage", "3", "--dtype", "fp32", "--workdir",
                                    str(tmp_path)], world_size=2, timeout=300)
    rows = run_rows({"results": results, "export": str(tmp_path / "export")})
    assert rows["devices"] == ["cpu:1"] and rows["layers_owned_by_rank"]["1"] > 0
    assert rows["split_error_max"] < 1e-6 and rows["resample_logits_rel_change"] < 1e-5
    assert rows["resumed_bit_for_bit"] and rows["export_shards"] > 1
