"""Epoch batching for 1..N DDP ranks: every sample exactly once, equal step counts per rank.

torch's DistributedSampler pads the epoch with repeated samples so ranks divide evenly; we
want each sample once per epoch *and* the same number of steps on every rank (a rank that runs
out first would leave the others waiting in an all-reduce forever). So: one permutation per
(seed, epoch), cut into global batches of `batch_size × world` samples, each dealt round-robin
to the ranks. A short tail that could not give every rank at least two samples (BatchNorm and
in-batch negatives need two) is folded into the previous global batch, or, with `drop_last`
(models whose in-batch negatives need full batches), every incomplete batch is left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if n < 2 * world_size:
            raise ValueError(f"{n} samples cannot feed {world_size} ranks at >= 2 per batch")
        if drop_last and n < batch_size * world_size:
            raise ValueError(f"{n} samples make no full batch of {batch_size} x {world_size}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.epoch = seed, shuffle, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        batches = list(torch.split(order, self.batch_size * self.world))
        if self.drop_last:
            return batches[:len(self)]
        if len(batches) > 1 and len(batches[-1]) < 2 * self.world:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            yield batch[self.rank::self.world].tolist()

    def __len__(self) -> int:
        full, tail = divmod(self.n, self.batch_size * self.world)
        if tail == 0 or self.drop_last:
            return full
        return full + (1 if tail >= 2 * self.world or full == 0 else 0)
