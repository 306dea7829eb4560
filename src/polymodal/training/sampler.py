"""A deterministic, resumable order over a dataset, and the DataLoader built on it.

Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``. The only
state is how many items have been consumed, so resuming at item ``k`` replays exactly the remaining
stream of an uninterrupted run.
"""

from __future__ import annotations

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


def build_loader(
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any],
    *,
    batch_size: int,
    seed: int,
    start: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader of ``batch_size`` items in :class:`EpochSampler` order from item ``start``.

    Batches run across epoch boundaries, so every batch is full and item ``k`` always lands in
    batch ``k // batch_size``. The loader gets its own generator: creating an iterator would
    otherwise draw a worker base seed from the global RNG and shift dropout in the model.
    A dataset whose ``reads_keys`` is True gets ``ItemKey(epoch, index)``s: its augmentation is
    drawn from them, and replays exactly on resume in any worker. Random augmentations that draw
    from a global RNG inside worker processes are not replayed exactly on resume; with
    ``num_workers=0`` they run on the (restored) main-process RNG and are.
    """
    sampler = EpochSampler(len(dataset), seed=seed, start=start, keyed=getattr(dataset, "reads_keys", False))
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
