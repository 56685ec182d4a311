"""GPU-only: the quick form of ``make gpu-check`` must pass (skipped without CUDA; ``make test``
on a CPU machine skips it, the CPU-side tests of the CUDA path are tests/unit/test_cuda_path.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_gpu_check_passes():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick", "--skip", "cli"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_gpu_check_without_cuda_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "no CUDA device on this machine; nothing checked" in proc.stdout
