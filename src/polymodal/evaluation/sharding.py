"""Evaluation shared out over the ranks of a data-parallel run: the split is cut into the batches
one process would make (in order, ``batch_size`` items each), rank r computes batches r, r + W,
r + 2W ..., and every rank gathers every batch's result, in batch order. Each batch is the very
batch one process would compute, so the figures made from the gathered results are those of one
process, bitwise (no float sum is regrouped, no padding changes); W ranks do 1/W of the work each.

Results are gathered after each round of W batches (one all-gather of Python objects); ``enough``,
asked on the results after each batch as one process would, stops every rank in the same round (a
limit on items) and drops the results past it: at most W - 1 batches are computed in vain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from polymodal.distributed.collectives import gather_objects
from polymodal.distributed.process import rank, world_size


def map_batches(
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any],
    fn: Callable[[Any], Any],
    *,
    batch_size: int,
    enough: Callable[[list[Any]], bool] | None = None,
    on_round: Callable[[], None] | None = None,
) -> list[Any]:
    """``fn(batch)`` for the consecutive batches of ``dataset``, each computed by one rank.

    Every rank must call it with the same dataset and settings.

    Args:
        fn: a collated batch -> a picklable result (tensors on the CPU).
        enough: asked with the results so far (in batch order) after each batch; True stops there.
        on_round: called after each round (a progress bar's update).

    Returns:
        the results of the batches computed, in batch order, on every rank.
    """
    num_items, ranks = len(dataset), world_size()
    starts = list(range(0, num_items, batch_size))  # the first item of each batch
    results: list[Any] = []
    for first in range(0, len(starts), ranks):
        mine = first + rank()
        result = None
        if mine < len(starts):
            items = range(starts[mine], min(starts[mine] + batch_size, num_items))
            result = fn(collate_fn([dataset[i] for i in items]))
        for done in gather_objects(result)[: len(starts) - first]:  # the round's batches, in order
            results.append(done)
            if enough is not None and enough(results):  # one process would stop here: drop the rest
                return results
        if on_round is not None:
            on_round()
    return results
