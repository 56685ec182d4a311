"""The layers of rosa_ds and what each may import (see the README's Architecture section):

* the pure method (the package root and ``utils``) imports neither deepspeed nor the seam, the
  planner or the recipe;
* ``memory`` (the planner) imports neither deepspeed nor the seam or the recipe;
* only ``rosa_ds.ds`` imports deepspeed, and it never imports the recipe;
* ``rosa_ds.hf`` (the Trainer integration) uses the seam, never deepspeed itself nor the recipe,
  and nothing else in rosa_ds imports it.

Checked twice: statically on every module's import statements (module-level and inside
functions), and at run time in a fresh interpreter.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "rosa_ds"


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("ds", "recipe", "memory", "utils", "hf") else "method"


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out |= {name} | {f"{name}.{a.name}" for a in node.names}
    return out


MODULES = {".".join(p.relative_to(PKG.parent).with_suffix("").parts): p for p in PKG.rglob("*.py")}
# what each layer must never import
FORBIDDEN = {"method": ("deepspeed", "rosa_ds.ds", "rosa_ds.recipe", "rosa_ds.memory", "rosa_ds.hf"),
             "utils": ("deepspeed", "rosa_ds.ds", "rosa_ds.recipe", "rosa_ds.memory", "rosa_ds.hf"),
             "memory": ("deepspeed", "rosa_ds.ds", "rosa_ds.recipe", "rosa_ds.hf"),
             "ds": ("rosa_ds.recipe", "rosa_ds.hf"),
             "recipe": ("deepspeed", "rosa_ds.hf"),
             "hf": ("deepspeed", "rosa_ds.recipe")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layer_imports(module):
    layer = layer_of(module)
    if module == "rosa_ds":  # the package root loads the seam lazily inside initialize()
        layer = "ds"
    bad = sorted(i for i in imports_of(MODULES[module]) for f in FORBIDDEN[layer] if i == f or i.startswith(f + "."))
    assert not bad, f"{module} ({layer} layer) imports {bad}"


def test_the_static_check_can_fail():
    assert "deepspeed" in imports_of(PKG / "ds" / "dist.py")
    assert "rosa_ds.ds.config.build_ds_config" in imports_of(PKG / "recipe" / "config.py") or \
        "rosa_ds.ds.config" in imports_of(PKG / "recipe" / "config.py")


def test_pure_packages_do_not_load_deepspeed_at_run_time():
    pure = ["rosa_ds", "rosa_ds.config", "rosa_ds.factorize", "rosa_ds.layer", "rosa_ds.inject", "rosa_ds.schedule",
            "rosa_ds.quant", "rosa_ds.memory", "rosa_ds.memory.__main__", "rosa_ds.ds.config", "rosa_ds.owners",
            "rosa_ds.recipe.config", "rosa_ds.recipe.data", "rosa_ds.utils.options"]
    code = (f"import sys\nfor m in {pure!r}: __import__(m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'deepspeed'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_seam_does():
    out = subprocess.run([sys.executable, "-c", "import sys, rosa_ds.ds.engine; print('deepspeed' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("True"), out.stderr
