"""Large-model pieces that need no processes: sizes, the shard writer, safetensors ranges, and the
per-phase memory plan."""
import json

import pytest
import torch

from rosa_ds.memory import MemoryPlan
from rosa_ds.memory.counts import ModelCounts
from rosa_ds.memory.phases import PHASES, phase_peaks
from rosa_ds.utils.sizes import format_size, parse_size


def test_sizes():
    assert parse_size("50GB") == 50 * 10**9 and parse_size("80GiB") == 80 * 2**30 and parse_size("512") == 512
    assert parse_size("1.5 MiB") == 3 * 2**19 and format_size(3 * 2**29) == "1.50 GiB"
    with pytest.raises(ValueError, match="'5 parsecs' is not a size; write e.g. 500MB"):
        parse_size("5 parsecs")


def test_shard_writer_names_and_index(tmp_path):
    """As save_pretrained: one file -> model.safetensors; several -> -0000i-of-0000N plus the index;
    a tensor larger than the limit gets a shard of its own."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from rosa_ds.ds.export import ShardWriter

    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    tensors["big"] = torch.ones(2048)  # 8 KiB
    writer = ShardWriter(tmp_path, 2048, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in tensors.values())
    assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
    back = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    one = tmp_path / "one"
    one.mkdir()
    single = ShardWriter(one, 1 << 20, [("x", (3,), torch.float32)])
    single.add("x", torch.ones(3))
    assert single.close() == ["model.safetensors"] and not (one / "model.safetensors.index.json").exists()


def test_partition_reads_match_the_tensor(tmp_path):
    """TensorIndex.read returns any slice of any tensor in its stored dtype (the partitioned loader's
    only access to the files)."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import save_file

    from rosa_ds.ds.load import TensorIndex

    a, b = torch.randn(7, 5), torch.randn(11).to(torch.bfloat16)
    save_file({"a": a, "b": b}, str(tmp_path / "m.safetensors"))
    index = TensorIndex([tmp_path / "m.safetensors"])
    assert torch.equal(index.read("a"), a.flatten()) and torch.equal(index.read("b", 3, 4), b[3:7])
    assert index.read("a", 35, 0).numel() == 0


def test_phase_peaks_cover_every_phase_and_scale_with_ranks():
    counts = ModelCounts(frozen=[4096 * 4096] * 8, groups=[[4096 * 8, 8 * 4096] * 8], adapted=[(4096, 4096)] * 8,
                         rank=8)
    peaks = {n: phase_peaks(counts, MemoryPlan(zero_stage=3, world_size=n, dtype="bf16")) for n in (2, 8)}
    assert list(peaks[2]) == list(PHASES)
    assert peaks[8]["load"].device * 3 < peaks[2]["load"].device  # ZeRO-3 load is partitioned: ~1/N
    z2 = phase_peaks(counts, MemoryPlan(zero_stage=2, world_size=8, dtype="bf16"))
    assert z2["load"].host == 2 * (8 * 4096 * 4096 + 16 * 4096 * 8)  # ZeRO-1/2: the whole model on the host


def test_safetensors_writer_matches_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from rosa_ds.utils.safetensors_io import write_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4, dtype=torch.int64),
               "empty": torch.zeros(0), "flag": torch.tensor([True, False])}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("fp16_supported", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_init_builds_parameters_in_the_dtype_asked_for(monkeypatch, fp16_supported, dtype):
    """ZeRO-3 loading and factor creation build under ``ZeroInit(dtype=model dtype)``: the dtype holds
    whether or not the accelerator supports fp16 (DeepSpeed's own choice turns an explicit fp32 into
    bf16 where fp16 is unsupported, as on the CPU accelerator on AMD EPYC). ``__init__`` sets
    ``self.dtype`` through ``_set_dtype`` only; the rest of it needs a process group."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    from rosa_ds.ds.zero_init import ZeroInit

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: fp16_supported)
    init = object.__new__(ZeroInit)
    init._set_dtype(None, dtype)
    assert init.dtype == dtype


def test_buffers_built_in_the_training_dtype_get_their_meant_dtype_and_values_back():
    """zero.Init builds every floating tensor in the training dtype: a rotary inv_freq in bf16 moved
    every position's angle (0.6% of the logits against from_pretrained). Simulated here by rounding
    the buffers to bf16 as zero.Init leaves them."""
    from rosa_ds.ds.load import restore_buffer_dtypes
    from tests.helpers.models import tiny_model

    build = lambda: tiny_model("llama", seed=0)  # noqa: E731
    model, meant = build(), build()
    for name, buf in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buf.to(torch.bfloat16)
    changed = restore_buffer_dtypes(model, build, loaded=set())
    assert changed and all("rotary" in n for n in changed), changed
    for (name, got), (_, want) in zip(model.named_buffers(), meant.named_buffers()):
        assert got.dtype == want.dtype and torch.equal(got, want), name  # recomputed, not the rounded values
    assert restore_buffer_dtypes(model, build, loaded=set()) == []  # nothing left to change
