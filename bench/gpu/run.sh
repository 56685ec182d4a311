#!/usr/bin/env bash
# The GPU verdict in one call, on a lent (offline) GPU machine, from the repository root:
#   bash bench/gpu/run.sh                   # after `make gpu-pack` here, with .gpu carried
# Installs the pack's wheels the image lacks into a temporary target (--no-index), then runs
# bench/gpu/check.py under one overall deadline (ROSA_GPU_DEADLINE_S, default 420 s = 7 min);
# the verdict (gpu_verdict.{json,md}) is rewritten after every check into $OUT when set, else
# bench/results/. Extra arguments go to check.py (--rehearsal: the CPU accelerator, for the tests).
# Exit: non-zero when the install fails, a GPU is visible but torch has no CUDA, or a check fails.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
PACK=${ROSA_GPU_PACK:-$ROOT/.gpu}
RESULTS=${OUT:-$ROOT/bench/results}
DEADLINE_S=${ROSA_GPU_DEADLINE_S:-420}
START=$(date +%s)
TARGET=$(mktemp -d "${TMPDIR:-/tmp}/rosa_gpu_site.XXXXXX")
trap 'rm -rf "$TARGET"' EXIT
mkdir -p "$RESULTS"
"$PY" -m bench.gpu.install --wheels "$PACK/wheels" --target "$TARGET" --report "$RESULTS/gpu_install.json" \
    || exit 3
export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$TARGET/bin:$PATH"
LEFT=$(( DEADLINE_S - ($(date +%s) - START) ))
# the driver keeps its own deadline 30 s short of this one, so it writes its verdict before the kill
timeout --kill-after=10 "$LEFT" "$PY" -m bench.gpu.check --out "$RESULTS" --deadline-s $(( LEFT - 30 )) "$@"
