"""Fine-tune with ROSA (or LoRA / full) on DeepSpeed.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json     # the embedded default, N ranks
    python launch/train.py --help                                     # every flag
"""
import sys

from rosa_ds.cli import main

if __name__ == "__main__":
    sys.exit(main())
