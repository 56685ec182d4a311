"""Plan per-rank memory without loading weights (meta device), e.g. a 7B model on a laptop:

    python launch/memory_report.py --model path/to/config.json --method rosa --rank 16 --zero 3 \
        --world-size 64 --dtype bf16 --micro-batch 4 --seq-len 2048 --markdown report.md --png report.png

Same as ``python -m rosa_ds.memory``; see docs/memory.md for the formulas.
"""
import sys

from rosa_ds.memory.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
