"""Epoch batching across ranks: each sample once per epoch, equal steps, seeded order."""

from __future__ import annotations

import pytest

from geco.data.sampler import EpochBatchSampler


def epoch(n, b, world, seed=0, ep=0):
    per_rank = []
    for rank in range(world):
        s = EpochBatchSampler(n, b, rank=rank, world_size=world, seed=seed)
        s.set_epoch(ep)
        batches = list(s)
        assert len(batches) == len(s)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("n, b, world", [
    (100, 8, 1), (100, 8, 2), (101, 8, 2), (97, 5, 3), (17, 4, 2), (33, 16, 2), (5, 64, 2),
    (2 * 8 * 2 + 3, 8, 2),  # tail of 3 < 2 ranks x 2: folded into the previous batch
])
def test_every_sample_once_and_equal_steps(n, b, world):
    per_rank = epoch(n, b, world)
    steps = {len(r) for r in per_rank}
    assert len(steps) == 1, f"ranks disagree on the number of steps: {steps}"
    seen = sorted(i for r in per_rank for batch in r for i in batch)
    assert seen == list(range(n))
    assert all(len(batch) >= 2 for r in per_rank for batch in r)
    assert all(len(batch) <= b + 2 for r in per_rank for batch in r)


def test_order_depends_on_seed_and_epoch_only():
    a, again = epoch(50, 8, 2, seed=1, ep=0), epoch(50, 8, 2, seed=1, ep=0)
    assert a == again
    assert a != epoch(50, 8, 2, seed=1, ep=1)
    assert a != epoch(50, 8, 2, seed=2, ep=0)


def test_global_batches_do_not_depend_on_world_size():
    one = epoch(64, 8, 1)[0]
    two = epoch(64, 4, 2)
    merged = [sorted(x + y) for x, y in zip(*two, strict=True)]
    assert merged == [sorted(x) for x in one]


def test_too_few_samples_for_the_ranks():
    with pytest.raises(ValueError, match="ranks"):
        EpochBatchSampler(3, 4, world_size=2)


@pytest.mark.parametrize("n, b, world", [(10, 3, 1), (17, 4, 2), (16, 4, 2)])
def test_drop_last_keeps_full_batches_only(n, b, world):
    """Models whose in-batch negatives need full batches: every batch has exactly b samples
    on every rank, no sample twice, and at most b x world - 1 samples sit out an epoch."""
    per_rank = []
    for rank in range(world):
        s = EpochBatchSampler(n, b, rank=rank, world_size=world, seed=1, drop_last=True)
        batches = list(s)
        assert len(batches) == len(s) == n // (b * world)
        assert all(len(batch) == b for batch in batches)
        per_rank.append([i for batch in batches for i in batch])
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen)) and n - len(seen) < b * world
    with pytest.raises(ValueError, match="no full batch"):
        EpochBatchSampler(3, 4, drop_last=True)
