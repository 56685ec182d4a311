"""Build the GPU pack (``make gpu-pack``, here, with the network): what a lent, offline GPU machine
needs to run ``bench/gpu/run.sh`` in one call, in the git-ignored folder ``.gpu/``.

    python -m bench.gpu.pack [--out .gpu] [--limit-mib 60]

* ``wheels/``: every distribution of ``bench/gpu/requirements-pack.txt`` as a Python 3.12
  manylinux x86_64 wheel (``pip download --only-binary=:all: --no-deps``); deepspeed, an sdist,
  is built here into a pure-Python wheel without prebuilt ops (``DS_BUILD_OPS=0``: DeepSpeed then
  JIT-builds an op only if asked for one, and the checks use none);
* ``models/``: the configs of the checks' models (built from config on the device: no weights);
* ``manifest.json``: every file with its size and sha256, the commit, the total.

The pack travels with the working tree (at most 64 MiB in all, carry included), so it fails above
``--limit-mib`` rather than leave a pack that cannot travel.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.gpu.models import MODEL_CONFIGS

ROOT = Path(__file__).resolve().parents[2]

REQUIREMENTS = Path(__file__).with_name("requirements-pack.txt")
# The device image's interpreter and platform (manylinux2014 = glibc 2.17; newer tags for wheels
# that only ship those, e.g. bitsandbytes' manylinux_2_24).
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_24_x86_64",
          "--platform", "manylinux_2_28_x86_64"]
BUILT_HERE = {"deepspeed"}  # sdists, built into pure-Python wheels


def pinned() -> list[str]:
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def fetch_wheels(wheels: Path) -> None:
    reqs = pinned()
    built = [r for r in reqs if r.split("==")[0] in BUILT_HERE]
    pip("download", "--only-binary=:all:", "--no-deps", *TARGET, "-d", str(wheels),
        *[r for r in reqs if r not in built])
    # --no-build-isolation: deepspeed's setup.py imports torch (any build: no op is compiled)
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip("wheel", "--no-deps", "--no-cache-dir", "--no-build-isolation", "--no-binary", ",".join(BUILT_HERE),
        "-w", str(wheels), *built, env=env)


def manifest(out: Path) -> dict:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[str(path.relative_to(out))] = {"bytes": path.stat().st_size,
                                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "requirements": pinned(), "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    ap.add_argument("--limit-mib", type=float, default=60.0)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "models").mkdir(parents=True)
    fetch_wheels(args.out / "wheels")
    for name, config in MODEL_CONFIGS.items():
        (args.out / "models" / f"{name}.json").write_text(json.dumps(config, indent=1))
    data = manifest(args.out)
    (args.out / "manifest.json").write_text(json.dumps(data, indent=1))
    mib = data["total_bytes"] / 2**20
    print(f"gpu-pack: {len(data['files'])} files, {mib:.1f} MiB in {args.out}")
    if mib > args.limit_mib:
        print(f"gpu-pack: {mib:.1f} MiB is over the {args.limit_mib:g} MiB that can travel with the working tree; "
              "fix: drop the largest optional wheel (bitsandbytes) from bench/gpu/requirements-pack.txt")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
