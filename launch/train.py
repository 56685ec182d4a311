"""Fine-tune with ROSA (or LoRA / full) on DeepSpeed.

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json     # the embedded default, N ranks
    python launch/train.py --help                                     # every flag
"""
from rosa_ds.recipe.cli import main
from rosa_ds.utils.dist import exit_now

if __name__ == "__main__":
    exit_now(main())
