"""Collation ahead of the step: the prefetcher hands out exactly the batches of the plain loader, in
order; skip counts reach the training process per consumed batch (from a thread or a DataLoader
worker); failures surface in the consumer; closing stops the thread."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from polymodal.training.sampler import CountedCollate, Prefetcher, build_loader


class _DroppingCollate:
    """Stacks items; an item divisible by 5 stands for a sample that failed to load (dropped, counted)."""

    def __init__(self) -> None:
        self.num_skipped = 0

    def __call__(self, items: list[torch.Tensor]) -> torch.Tensor:
        kept = [x for x in items if int(x) % 5]
        self.num_skipped += len(items) - len(kept)
        return torch.stack(kept)


def _expected(count: int) -> tuple[list[torch.Tensor], list[int]]:
    """The plain loader's first ``count`` batches and the skips after each, counted by hand."""
    collate = _DroppingCollate()
    batches, skips = [], []
    for batch in itertools.islice(build_loader(torch.arange(1, 24), collate, batch_size=4, seed=3), count):
        batches.append(batch)
        skips.append(collate.num_skipped)
    return batches, skips


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_hands_out_the_loaders_batches_and_counts_consumed_skips(depth):
    expected, skips = _expected(12)  # three epochs of 23 items and more
    loader = build_loader(torch.arange(1, 24), CountedCollate(_DroppingCollate()), batch_size=4, seed=3)
    batches = Prefetcher(iter(loader), depth=depth)
    try:
        for want, skipped in zip(expected, skips):
            assert torch.equal(next(batches), want)
            assert batches.num_skipped == skipped  # never ahead of the batches handed out
    finally:
        batches.close()
    assert batches.thread is None


def test_skip_counts_reach_the_trainer_from_a_dataloader_worker():
    expected, skips = _expected(6)
    collate = _DroppingCollate()
    loader = build_loader(torch.arange(1, 24), CountedCollate(collate), batch_size=4, seed=3, num_workers=1)
    batches = Prefetcher(iter(loader), depth=2)
    try:
        got = [next(batches) for _ in range(6)]
    finally:
        batches.close()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert batches.num_skipped == skips[-1] > 0
    assert collate.num_skipped == 0  # the worker's copy counted, not this one


def test_a_failing_collate_raises_in_the_consumer_every_time():
    def collate(items):
        if int(items[0]) == 99:
            raise ValueError("bad sample 99")
        return items[0], 0

    batches = Prefetcher(iter(map(lambda x: collate([x]), torch.tensor([1, 2, 99, 4]))), depth=2)
    assert int(next(batches)) == 1 and int(next(batches)) == 2
    for _ in range(2):
        with pytest.raises(ValueError, match="bad sample 99"):
            next(batches)
    batches.close()


def test_the_end_of_the_stream_and_close():
    batches = Prefetcher(iter([(torch.tensor(1), 0)]), depth=1)
    assert list(batches) == [torch.tensor(1)]
    with pytest.raises(StopIteration):
        next(batches)
    endless = Prefetcher(((torch.zeros(()), 0) for _ in itertools.count()), depth=2)
    next(endless)
    endless.close()  # the producer is blocked on a full queue: close must still end it
    assert endless.thread is None
    assert not any(t.name == "polymodal-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter([]), depth=-1)
