"""Deterministic distributed batch order, resumable mid-epoch.

Each epoch draws one permutation of the sample indices from ``(seed, epoch)`` with Python's
``random.Random`` seeded by a string (hashed with SHA-512 inside ``random``; stable across
processes, machines and Python versions, unlike ``hash()``). Optimizer step t of the epoch uses
the global batch ``perm[t*G:(t+1)*G]`` with ``G = micro_batch * world_size * grad_accum``; the last
incomplete global batch is dropped, so every step sees exactly G samples.

Within a global batch, sample j (0 <= j < G) goes to accumulation step ``a = j // (micro*world)``
and rank ``r = (j % (micro*world)) // micro``. What holds:
- the union over ranks and accumulation steps of step t's micro batches is the global batch,
  with no overlap;
- for a fixed seed and G, step t's global batch is the same set of samples for ANY factorisation
  G = micro * world * accum (e.g. 1 rank x accum 4 or 2 ranks x accum 2); only which rank sees
  which sample changes. Token-mean losses still differ slightly across factorisations because
  each micro batch averages over its own token count;
- ``micro_batches(epoch, skip_batches=k)`` equals ``micro_batches(epoch)`` without its first k steps,
  so resuming from a checkpoint at step k of an epoch continues the same sequence.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ...errors import ConfigError


@dataclass(frozen=True)
class BatchOrder:
    """This rank's sample indices for every micro batch of an epoch.

    Attributes:
        num_samples: size of the training split.
        micro_batch: samples per rank per forward/backward.
        world_size: number of data-parallel ranks.
        rank: this process's data-parallel rank (0-based).
        grad_accum: micro batches accumulated per optimizer step.
        seed: shuffle seed; epoch e uses the permutation drawn from (seed, e).
    """

    num_samples: int
    micro_batch: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "micro_batch", "world_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BatchOrder.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"BatchOrder.rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"{self.num_samples} training samples are fewer than one global batch of {self.global_batch} "
                f"(micro batch {self.micro_batch} x world size {self.world_size} x grad accum {self.grad_accum}); "
                "lower --micro-batch/--grad-accum or use more data")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; the last incomplete global batch is dropped."""
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        perm = list(range(self.num_samples))
        random.Random(f"rosa_ds-order:{self.seed}:{epoch}").shuffle(perm)
        return perm

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' samples of each optimizer step of ``epoch`` (the same on every rank)."""
        perm, g = self.permutation(epoch), self.global_batch
        return [perm[t * g:(t + 1) * g] for t in range(self.steps_per_epoch)]

    def micro_batches(self, epoch: int, skip_batches: int = 0) -> list[list[int]]:
        """This rank's micro batches, in order, for steps ``skip_batches`` .. end of ``epoch``.

        ``skip_batches`` counts optimizer steps (global batches) already done in this epoch.
        The result can be passed as ``batch_sampler`` to a ``torch.utils.data.DataLoader``.
        """
        if not 0 <= skip_batches <= self.steps_per_epoch:
            raise ConfigError(f"skip_batches {skip_batches} is outside 0..{self.steps_per_epoch} (steps per epoch)")
        per_accum = self.micro_batch * self.world_size
        out = []
        for batch in self.global_batches(epoch)[skip_batches:]:
            for a in range(self.grad_accum):
                start = a * per_accum + self.rank * self.micro_batch
                out.append(batch[start:start + self.micro_batch])
        return out
