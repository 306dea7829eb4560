"""Loss terms that are means over tokens (or frames, or items) made global across ranks.

A term averaged over the n_r target tokens of rank r's batch is the mean over its own tokens; DDP
then averages the ranks' gradients, which gives the mean over all N = sum_r n_r tokens only when
every rank holds as many. Weighing rank r's term by ``W * n_r / N`` makes the average over the W
ranks ``sum_r n_r L_r / N``, the mean over every rank's tokens: the loss, and so the gradient, one
process would compute on the concatenated batch (each caption's tokens count once, whatever rank
holds it). The counts come from ``StepOutput.counts``; one all-gather of them per micro-batch.

In a single process nothing is weighed (the terms are left bitwise as they are).

Reference: Li et al. 2020, PyTorch Distributed, arXiv:2006.15704 (gradients averaged over ranks).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from polymodal.distributed.collectives import gather_objects
from polymodal.distributed.process import world_size


def global_mean_shares(counts: Mapping[str, Tensor | int]) -> dict[str, float]:
    """Each counted term's weight ``W * n_r / N`` on this rank (N: the term's count summed over every
    rank); empty in a single process. Every rank of a data-parallel step must call it, with or
    without terms (a rank whose batch lacks a term counts 0 of its units).

    Args:
        counts: term name -> () n_r, how many units this rank's term averages over.

    Returns:
        term name -> weight, for the terms in ``counts`` (1.0 for a term no rank has a unit of).
    """
    if world_size() == 1:
        return {}
    mine = {name: int(count) for name, count in counts.items()}
    totals: dict[str, int] = {}
    for counts_r in gather_objects(mine):
        for name, count in counts_r.items():
            totals[name] = totals.get(name, 0) + count
    return {name: world_size() * count / totals[name] if totals[name] > 0 else 1.0 for name, count in mine.items()}


def global_means(losses: Mapping[str, Tensor], counts: Mapping[str, Tensor | int]) -> dict[str, Tensor]:
    """``losses`` with each term named in ``counts`` weighed by :func:`global_mean_shares`; the
    terms themselves (not copied, not multiplied) in a single process."""
    shares = global_mean_shares(counts)
    return {name: term * shares[name] if name in shares else term for name, term in losses.items()}
