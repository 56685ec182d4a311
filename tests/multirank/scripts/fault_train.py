"""``launch/train.py`` with faults injected at chosen optimizer steps on rank ``ROSA_FAULT_RANK``
(default 0); test-only, production code has no hooks. ``ROSA_FAULT`` is ``kind@K[,kind@K...]``:

    nan@K          the loss of step K is multiplied by NaN
    sigterm@K      SIGTERM to the job's process group (runner, launcher, every rank: what Slurm and
                   Kubernetes send) during step K
    sigint@K       the same with SIGINT (Ctrl-C in a terminal)
    runner@K       SIGTERM to the ``deepspeed`` runner alone (the launcher's parent)
    sigkill@K      the rank kills itself with SIGKILL (the OOM killer)
    hang@K         sleep for an hour (a hung rank)
    hold@K         wait before step K until the file ``ROSA_FAULT_RELEASE`` exists
    error@0        a bad-input error in the input checks, found by this rank at once and by the
                   other ranks ``ROSA_FAULT_DELAY`` seconds later (the launcher kills every rank
                   when the first one exits)

With ``ROSA_FAULT_STAMP`` set, the time of each injection is appended to that file first.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from rosa_ds.recipe import trainer as trainer_module  # noqa: E402
from rosa_ds.recipe.cli import main  # noqa: E402
from rosa_ds.recipe.data.config import DataError  # noqa: E402
from rosa_ds.utils.dist import exit_now, global_rank  # noqa: E402

# "kind@step[,kind@step...]"
FAULTS = [(k, int(at)) for k, _, at in (f.partition("@") for f in os.environ.get("ROSA_FAULT", "").split(",") if f)]
rank = int(os.environ.get("ROSA_FAULT_RANK", "0"))
original = trainer_module.Trainer.micro_step


def inject(self, kind: str, batch):
    """Run the fault ``kind`` during this micro step; returns the step's result for ``nan``."""
    if os.environ.get("ROSA_FAULT_STAMP"):
        with open(os.environ["ROSA_FAULT_STAMP"], "a") as f:
            f.write(f"{kind} {time.time()!r}\n")
    if kind in ("sigterm", "sigint"):  # Ctrl-C in a terminal: SIGINT to the foreground process group
        os.killpg(os.getpgid(0), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
    elif kind == "runner":
        launcher = os.getppid()
        with open(f"/proc/{launcher}/stat") as f:
            os.kill(int(f.read().rsplit(")", 1)[1].split()[1]), signal.SIGTERM)
    elif kind == "hold":
        while not Path(os.environ["ROSA_FAULT_RELEASE"]).exists():
            time.sleep(0.1)
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "nan":
        forward = self.engine.ds.module.forward

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out

        self.engine.ds.module.forward = poisoned
        try:
            return original(self, batch)
        finally:
            self.engine.ds.module.forward = forward
    return None


def micro_step(self, batch):
    done = self.__dict__.setdefault("_faults_done", set())
    for kind, step in FAULTS:
        if global_rank() == rank and self.engine.global_step + 1 == step and (kind, step) not in done:
            done.add((kind, step))
            result = inject(self, kind, batch)
            if result is not None:
                return result
    return original(self, batch)


trainer_module.Trainer.micro_step = micro_step


def check(cfg, on_rank, world):
    if global_rank() != rank:
        time.sleep(float(os.environ.get("ROSA_FAULT_DELAY", "3")))
    raise DataError("--dataset has a record the run cannot use (an injected error)")


if any(kind == "error" for kind, _ in FAULTS):
    trainer_module.check = check  # the input checks (``rosa_ds.recipe.spec.check``) as run() calls them

if __name__ == "__main__":
    exit_now(main())
