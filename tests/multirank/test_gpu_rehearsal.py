"""The GPU verdict's entry point (``bench/gpu/run.sh``) rehearsed on the CPU accelerator, so the
one call a lent GPU gets cannot rot before a GPU arrives: a fake wheelhouse is installed offline
into a temporary target, then the driver runs its environment check, the two-rank ZeRO-3 bf16
pair (gloo) against one rank and the CPU fp32 reference, the step check (on the tiny Llama) and the
partitioned load against ``from_pretrained``, writing its verdict as it goes."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "rosa_gpu_probe"


def fake_wheel(wheels: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel: one module, its dist-info."""
    info = f"{name}-{version}.dist-info"
    path = wheels / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: rosa_ds tests\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_gpu_verdict_rehearsal_on_the_cpu_accelerator(tmp_path):
    wheels = tmp_path / "pack" / "wheels"
    wheels.mkdir(parents=True)
    fake_wheel(wheels, PROBE, "1.0")  # missing from the environment: must be installed into the target
    fake_wheel(wheels, "deepspeed", "0.0.1")  # present: must be left alone (installing it would shadow it)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "ROSA_GPU_PACK": str(tmp_path / "pack"), "OUT": str(out),
           "ROSA_GPU_DEADLINE_S": "420", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "run.sh"), "--rehearsal"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=480)
    verdict = json.loads((out / "gpu_verdict.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    install = json.loads((out / "gpu_install.json").read_text())
    assert install["installed"] == [f"{PROBE}-1.0-py3-none-any.whl"] and "deepspeed-0.0.1-py3-none-any.whl" in \
        install["image_has"]
    environment = verdict["checks"]["environment"]
    assert environment["rows"]["from_the_pack"] == {f"{PROBE}-1.0-py3-none-any.whl": True}
    pair = verdict["checks"]["pair_zero3"]["rows"]
    assert pair["world2"]["layers_owned_by_rank"]["1"] > 0 and pair["world2"]["ranks"] == 2
    assert pair["world2"]["split_error_max"] <= 1e-6  # the first factorization exact in bf16
    assert all(pair[n]["resumed_bit_for_bit"] and pair[n]["export_shards"] > 1 for n in ("world2", "world1"))
    assert pair["compare"]["loss_world2_vs_world1"] < 1e-3  # bf16 ZeRO-3 ranks vs one rank: same batches
    step = verdict["checks"]["step_llama7b_shape"]["rows"]  # the tiny Llama in a rehearsal
    assert step["losses"][-1] < step["losses"][0] and step["tokens_per_s"] > 0 < step["resample_seconds_per_layer"]
    loaded = verdict["checks"]["load_partitioned"]["rows"]  # zero.Init once made the rotary inv_freq bf16
    assert all(not loaded[d]["params_differing"] and loaded[d]["logits_max_relative_difference"] <= 1e-6
               for d in ("fp32", "bf16")), loaded
    assert verdict["verdict"] == "passed so far" and "## pair_zero3: passed" in (out / "gpu_verdict.md").read_text()


def test_a_visible_gpu_without_cuda_fails_the_verdict(monkeypatch, tmp_path, capsys):
    """A GPU node whose torch has no CUDA must not "pass" with nothing checked."""
    from bench.gpu import check

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(check, "gpu_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = check.argparse.Namespace(out=tmp_path, deadline_s=60, only="", rehearsal=False)
    assert check.run_checks(args) == 2
    assert "a GPU is visible but torch" in capsys.readouterr().out
