"""One rank of the GPU verdict's engine run (``bench/gpu/pair_rank.py``: first factorization,
3 steps, a resample, save, resume, sharded export) with the seam's device on the CPU stand-in
accelerator at index ``--stand-in-index`` (not 0)."""
import sys

import torch

from tests.helpers import stand_in

at = sys.argv.index("--stand-in-index")
index = int(sys.argv[at + 1])
del sys.argv[at:at + 2]
stand_in.install(torch.device("cpu", index))
seen = set(stand_in.seam_devices().values())
if seen != {f"cpu:{index}"}:
    raise SystemExit(f"seam modules disagree on the device: {seen}")

from bench.gpu import pair_rank  # noqa: E402

pair_rank.main()
