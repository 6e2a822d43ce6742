"""Which samples each optimizer step reads, as a pure function of (seed, epoch, rank).

Every epoch is PyTorch's DistributedSampler order (shuffled with seed + epoch; padded so
every rank gets as many samples; with one process it is a plain shuffle), cut into
micro-batches of `batch_size`, grouped `grad_accum` to a step; an epoch's last step may
hold fewer. A data position is (epoch, micro-batch index): a resumed run rebuilds the
same order and skips to it, so it reads exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.utils.data.distributed import DistributedSampler

__all__ = ["BatchPlan"]


@dataclass(frozen=True)
class BatchPlan:
    dataset_size: int
    batch_size: int
    grad_accum: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise ValueError("the dataset is empty")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")

    @property
    def micro_batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.dataset_size / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) of one epoch, in order."""
        sampler = DistributedSampler(range(self.dataset_size), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=self.shuffle, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        order = list(sampler)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
