#!/usr/bin/env bash
# ROSA with TRL under `accelerate launch` and DeepSpeed ZeRO-3 (the project's ds_configs/zero3.json:
# its "auto" values are filled from the SFTConfig; its WarmupDecayLR is dropped so the SFTConfig's
# schedule runs, as rosa_ds says once). Models are built partitioned (--zero3_init_flag true).
#
#   examples/accelerate_zero3.sh OUT_DIR [examples/sft_trl.py options]
#   NPROC=4 examples/accelerate_zero3.sh OUT_DIR --max-train-samples 512
set -euo pipefail
OUT=${1:?usage: examples/accelerate_zero3.sh OUT_DIR [examples/sft_trl.py options]}
shift
cd "$(dirname "$0")/.."
exec accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero3.json --zero3_init_flag true \
    --num_processes "${NPROC:-2}" --num_machines 1 --main_process_port "${PORT:-29517}" \
    examples/sft_trl.py --output-dir "$OUT" --deepspeed '' "$@"
