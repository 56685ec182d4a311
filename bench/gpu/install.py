"""Install, into a temporary target, the pack's wheels whose distribution the image lacks.

    python -m bench.gpu.install --wheels .gpu/wheels --target DIR --report OUT/gpu_install.json

Offline: ``pip install --no-index --no-deps --find-links WHEELS --target DIR`` of the missing
ones only. ``--target`` resolves as if nothing were installed (it would ask for torch), hence
``--no-deps`` with the exact list; a distribution the image has (a different build of numpy,
pydantic ...) is left alone, so nothing of the image is shadowed. Exit 1 if pip fails.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def dist_name(wheel: Path) -> str:
    """The normalized distribution name of a wheel file (PEP 427: name-version-...)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--target", type=Path, required=True)
    ap.add_argument("--report", type=Path, required=True)
    args = ap.parse_args()
    wheels = sorted(args.wheels.glob("*.whl"))
    present = {w.name: installed(dist_name(w)) for w in wheels}
    missing = [w for w in wheels if present[w.name] is None]
    report = {"wheels": len(wheels), "image_has": {k: v for k, v in present.items() if v},
              "installed": [w.name for w in missing], "target": str(args.target)}
    if not wheels:
        report["error"] = f"no wheels in {args.wheels}; fix: run `make gpu-pack` and carry .gpu"
    elif missing:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "--find-links", str(args.wheels),
                               "--target", str(args.target), *map(str, missing)], capture_output=True, text=True)
        if proc.returncode != 0:
            report["error"] = (proc.stdout + proc.stderr)[-3000:]
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1))
    print(f"gpu-install: {len(missing)} of {len(wheels)} wheels installed into {args.target}"
          + (f"; FAILED: {report['error'][-300:]}" if "error" in report else ""))
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
