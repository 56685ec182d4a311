"""The run's checkpoints: saving (never from a non-finite state), keeping the newest intact ones,
loading the one ``check`` chose for ``--resume``, and saying where a failed run can resume from.

Each checkpoint's client state carries the data position (epoch, batches done in it) and the run's
facts (``RunSpec.facts``), so a resume is checked against the files alone before weights load.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ..ds.checkpoint import remove_partials
from ..utils.log import log_rank0
from .faults import Diverged
from .guard import trainable_finite
from .metrics import MetricsWriter, rewind
from .resume import notice


class Checkpointer:
    def __init__(self, spec, engine, metrics: MetricsWriter, keep: int = 2) -> None:
        self.spec, self.engine, self.metrics, self.keep = spec, engine, metrics, keep
        self.dir = spec.out / "checkpoints"
        self.last: Optional[Path] = None
        self.saved_step = -1

    def last_good(self) -> str:
        """Where a diverged run can be resumed from (no checkpoint is ever written from a
        non-finite state, so the newest one is good)."""
        return "there is no checkpoint" if self.last is None else f"the last good checkpoint is {self.last}"

    def save(self, epoch: int, batches_in_epoch: int) -> None:
        """Checkpoint; keep the ``keep`` newest complete ones (two survive a newest one damaged
        after its save). A ``checkpoint`` event records its save time and size."""
        start = time.perf_counter()
        eng = self.engine
        if not trainable_finite(eng):
            raise Diverged(f"non-finite trainable weights at step {eng.global_step}: no checkpoint written; "
                           f"{self.last_good()}; lower --lr")
        path = eng.save_checkpoint(self.dir, client_state={"epoch": epoch, "batches_in_epoch": batches_in_epoch,
                                                           "plan": self.spec.facts})
        seconds = time.perf_counter() - start
        self.last, self.saved_step = path, eng.global_step
        eng.prune_checkpoints(self.dir, self.keep)
        if self.spec.rank == 0:
            self.metrics.write({"event": "checkpoint", "step": eng.global_step, "seconds": round(seconds, 3),
                                "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
                                "frozen_record_bytes": frozen_bytes(path)})

    def resume(self) -> tuple[int, int]:
        """Load ``spec.resume``'s checkpoint; cut metrics.jsonl back to its step (recomputed steps
        are recorded once). Returns (epoch, batches already trained in it)."""
        choice, eng = self.spec.resume, self.engine
        client = eng.load_checkpoint(choice.path)
        self.saved_step, self.last = eng.global_step, choice.path
        if self.spec.rank == 0:
            stale = remove_partials(self.dir)  # every rank is past its checks (the process group exists)
            if stale:
                log_rank0(f"removed the interrupted saves {', '.join(stale)} from {self.dir}")
            dropped = rewind(self.metrics.path, eng.global_step)
            if dropped:
                log_rank0(f"metrics.jsonl rewound to step {eng.global_step}: {dropped} later records dropped")
        if choice.changes:
            line, changes = notice(choice.path, list(choice.changes))
            log_rank0(line)
            self.metrics.write({"event": "resume_changes", "step": eng.global_step, "changes": changes})
        return client["epoch"], client["batches_in_epoch"]


def frozen_bytes(checkpoint: Path) -> int:
    """Bytes of the frozen record a checkpoint names (shared by its resample cycle's checkpoints)."""
    record = checkpoint.parent / "frozen" / json.loads((checkpoint / "rosa_state.json").read_text())["frozen"]
    return sum(f.stat().st_size for f in record.rglob("*") if f.is_file())
