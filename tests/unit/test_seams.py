"""The method is pure PyTorch: only rosa_ds.zero (and what builds on it) may import deepspeed."""
import subprocess
import sys

PURE = ["rosa_ds", "rosa_ds.config", "rosa_ds.factorize", "rosa_ds.layer", "rosa_ds.inject", "rosa_ds.schedule",
        "rosa_ds.memory", "rosa_ds.data", "rosa_ds.dsconfig", "rosa_ds.train_config"]


def test_pure_modules_do_not_import_deepspeed():
    code = f"import sys\nfor m in {PURE!r}: __import__(m)\nprint(sorted(k for k in sys.modules if k.split('.')[0] == 'deepspeed'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_seam_does():
    out = subprocess.run([sys.executable, "-c", "import sys, rosa_ds.zero; print('deepspeed' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("True"), out.stderr
