"""Minibatch CKA: CKA over more examples than fit in one batch, from per-batch HSIC averages.

Nguyen et al. 2021, Do Wide and Deep Networks Learn the Same Things?, arXiv:2010.15327:

    CKA_minibatch = mean_b HSIC_u(X_b, Y_b) / sqrt(mean_b HSIC_u(X_b, X_b) * mean_b HSIC_u(Y_b, Y_b))

Each batch's unbiased HSIC is an unbiased estimate of the same population HSIC whatever the batch
size, so the averages converge to it as batches accumulate and the ratio to the population CKA.
The biased HSIC carries an O(1/n) bias per batch that averaging does not remove, so minibatch CKA
with it settles on a batch-size-dependent value; it is offered only to show that.

Memory is three running sums; each ``update`` costs one linear CKA in feature space (or one RBF
Gram per side), so a training loop can feed it the probe batches of an evaluation pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.diagnostics.cka import KERNELS
from polymodal.diagnostics.hsic import MIN_ITEMS_UNBIASED, centered_features, feature_hsic, gram_hsic
from polymodal.diagnostics.kernels import DEFAULT_BANDWIDTH_FRACTION, rbf_gram


class MinibatchCKA:
    """Accumulates HSIC(x, y), HSIC(x, x) and HSIC(y, y) over batches; ``compute`` forms CKA.

    Args:
        kernel: "linear" or "rbf" (the RBF width is set per batch from that batch's median distance).
        unbiased: average the unbiased HSIC (the paper's estimator); False averages the biased one.
        bandwidth_fraction: RBF width as a fraction of the median distance.
    """

    def __init__(
        self,
        *,
        kernel: str = "linear",
        unbiased: bool = True,
        bandwidth_fraction: float = DEFAULT_BANDWIDTH_FRACTION,
    ) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown CKA kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        self.kernel = kernel
        self.unbiased = unbiased
        self.bandwidth_fraction = bandwidth_fraction
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._sums = torch.zeros(3, dtype=torch.float64)  # HSIC(x, y), HSIC(x, x), HSIC(y, y)
        self.num_batches = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add one batch.

        Args:
            x: (n, dx) representation of a batch of n examples (n >= 4 when unbiased).
            y: (n, dy) representation of the same examples; n may change from batch to batch.
        """
        if self.unbiased and x.shape[0] < MIN_ITEMS_UNBIASED:
            raise ValueError(f"unbiased minibatch CKA needs batches of at least {MIN_ITEMS_UNBIASED}, got {x.shape[0]}")
        if self.kernel == "linear":
            x, y = centered_features(x, "x"), centered_features(y, "y")
            terms = [feature_hsic(a, b, unbiased=self.unbiased, centered=True) for a, b in ((x, y), (x, x), (y, y))]
        else:
            k = rbf_gram(x, bandwidth_fraction=self.bandwidth_fraction)
            l = rbf_gram(y, bandwidth_fraction=self.bandwidth_fraction)
            terms = [gram_hsic(a, b, unbiased=self.unbiased) for a, b in ((k, l), (k, k), (l, l))]
        self._sums += torch.stack(terms).cpu()
        self.num_batches += 1

    def compute(self) -> float:
        """CKA from the batches so far; NaN when a side's HSIC average is not positive."""
        if self.num_batches == 0:
            raise ValueError("MinibatchCKA.compute() before any update(x, y): feed at least one batch")
        cross, self_x, self_y = self._sums.tolist()  # sums: the 1/num_batches factors cancel
        if self_x <= 0 or self_y <= 0:
            return float("nan")
        return cross / (self_x * self_y) ** 0.5
