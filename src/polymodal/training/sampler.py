"""A deterministic, resumable order over a dataset, the DataLoader built on it, and the prefetcher
that collates the next batches while the current step runs.

Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``. The only
state is how many items have been consumed, so resuming at item ``k`` replays exactly the remaining
stream of an uninterrupted run. Prefetching changes none of this: batches are made in the same
order, and those made ahead of a checkpoint are made again after a resume (the data path reads no
global random state; augmentations draw from per-item generators, ``data/augment.py``).

Data-parallel runs read the same stream in global batches of ``world_size * batch_size`` items;
rank r takes the r-th ``batch_size`` of each (``ShardedSampler``). W ranks at batch B then see, step
by step, exactly the items one process sees at batch W * B, in the same order (rank 0's first), and
the position (items consumed over all ranks) resumes the run exactly at the same world size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from polymodal.data.batch import ItemKey
from polymodal.training.interrupt import ignore_stop_signals


class EpochSampler(Sampler[int]):
    """An endless stream of indices: one fresh permutation per epoch, starting at item ``start``.

    Args:
        num_items: dataset length ``n``.
        seed: epoch ``e`` uses the permutation from a generator seeded with ``seed + e``.
        start: items already consumed (over all epochs); the stream begins with item ``start``.
        keyed: yield ``ItemKey(epoch, index)`` instead of the index, for datasets that augment
            from the key (``data.keyed.TrainingItems``).
    """

    def __init__(self, num_items: int, *, seed: int, start: int = 0, keyed: bool = False) -> None:
        if num_items <= 0:
            raise ValueError(f"EpochSampler: the dataset is empty (num_items={num_items}); give it at least one item")
        if start < 0:
            raise ValueError(f"EpochSampler: start must be >= 0, got {start}")
        self.num_items = num_items
        self.seed = seed
        self.start = start
        self.keyed = keyed

    def permutation(self, epoch: int) -> torch.Tensor:
        """(n,) the order of epoch ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[int | ItemKey]:
        epoch, offset = divmod(self.start, self.num_items)
        while True:
            order = self.permutation(epoch)[offset:].tolist()
            yield from ((ItemKey(epoch, i) for i in order) if self.keyed else order)
            epoch, offset = epoch + 1, 0


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share of an :class:`EpochSampler` stream: of each global batch of
    ``world_size * batch_size`` items, the ``batch_size`` starting at ``rank * batch_size``.

    Args:
        num_items, seed, keyed: as :class:`EpochSampler`.
        start: items consumed over all ranks; a multiple of ``world_size * batch_size`` for exact resume.
        batch_size: items per rank per batch.
        rank, world_size: this process's place in the run.
    """

    def __init__(
        self, num_items: int, *, seed: int, start: int, batch_size: int, rank: int, world_size: int, keyed: bool = False
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: rank {rank} is not in [0, {world_size})")
        self.stream = EpochSampler(num_items, seed=seed, start=start, keyed=keyed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int | ItemKey]:
        stream = iter(self.stream)
        mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        while True:
            for position in range(self.world_size * self.batch_size):
                item = next(stream)
                if position in mine:
                    yield item


def build_loader(
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    seed: int,
    start: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """An endless DataLoader of ``batch_size`` items in :class:`EpochSampler` order from item ``start``.

    Batches run across epoch boundaries, so every batch is full and item ``k`` always lands in
    batch ``k // batch_size``. The loader gets its own generator: creating an iterator would
    otherwise draw a worker base seed from the global RNG and shift dropout in the model.
    A dataset whose ``reads_keys`` is True gets ``ItemKey(epoch, index)``s: its augmentation is
    drawn from them, and replays exactly on resume in any worker. Random augmentations that draw
    from a global RNG inside worker processes are not replayed exactly on resume; with
    ``num_workers=0`` they run on the (restored) main-process RNG and are. With ``world_size`` > 1,
    rank ``rank`` gets its share of each global batch (:class:`ShardedSampler`); ``start`` then
    counts the items of every rank.
    """
    keyed = getattr(dataset, "reads_keys", False)
    sampler: Sampler = EpochSampler(len(dataset), seed=seed, start=start, keyed=keyed)
    if world_size > 1:
        sampler = ShardedSampler(
            len(dataset), seed=seed, start=start, batch_size=batch_size, rank=rank, world_size=world_size, keyed=keyed
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + start),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,  # the main process handles them
    )


class CountedCollate:
    """A collate function that returns ``(batch, skipped)``: the batch and how many samples the
    wrapped collator dropped making it (its ``num_skipped`` before and after). The count travels
    with the batch, so it reaches the training process from a prefetch thread or a DataLoader
    worker alike (a worker's collator is a copy whose own counter the trainer never sees).
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> tuple[Any, int]:
        before = getattr(self.collate_fn, "num_skipped", 0)
        batch = self.collate_fn(samples)
        return batch, getattr(self.collate_fn, "num_skipped", 0) - before


class Prefetcher:
    """Batches from a stream of ``(batch, skipped)`` pairs (``CountedCollate``), made up to ``depth``
    ahead in a background thread, so collation runs while the model trains.

    ``num_skipped`` counts the samples dropped in the batches handed out so far (not those still
    queued), so a logged count matches the steps taken. ``depth=0`` makes each batch on demand, in
    the caller's thread. ``close`` stops the thread; batches made ahead are discarded (a resumed run
    makes them again from its checkpoint's data position).

    Args:
        pairs: an iterator of ``(batch, skipped)``, e.g. over a DataLoader with a ``CountedCollate``.
        depth: batches made ahead; 0 for none.
    """

    _END = object()

    def __init__(self, pairs: Iterator[tuple[Any, int]], *, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"Prefetcher: depth must be >= 0, got {depth}")
        self.pairs = pairs
        self.num_skipped = 0
        self.ended: BaseException | None = None  # what the stream ended with, raised again on every call
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stopping = threading.Event()
        self.thread = None
        if depth > 0:
            self.thread = threading.Thread(target=self._fill, name="polymodal-prefetch", daemon=True)
            self.thread.start()

    def _fill(self) -> None:
        """The thread: make batches until the stream ends, fails, or ``close`` is called."""
        try:
            for pair in self.pairs:
                if not self._put(pair):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        """Queue ``item``, waiting for room; False once closing (nobody will read it)."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self.ended is not None:
            raise self.ended
        if self.thread is None:
            batch, skipped = next(self.pairs)
        else:
            item = self.queue.get()
            if item is self._END or isinstance(item, BaseException):
                self.ended = StopIteration() if item is self._END else item
                raise self.ended
            batch, skipped = item
        self.num_skipped += skipped
        return batch

    def close(self) -> None:
        """Stop the thread (if any) and drop what it made ahead."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
