"""Input handling shared by the diagnostics: float64 copies, the (n, d) item layout, and the
convention for saying which modality each token belongs to.

Every diagnostic computes in float64 (STYLE.md): similarity indices divide sums of n^2 products
and canonical correlations come from near-singular whitening, where float32 loses several digits.
Apple's MPS has no float64, so there the computation moves to the CPU; on CUDA and the CPU it stays
on the input's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polymodal.modality import Modality

# Token modality ids index this tuple: Modality.IMAGE is 0, TEXT 1, AUDIO 2 (the enum's order,
# the same order as the modality-type embedding rows of models/alignment.py).
MODALITY_ORDER: tuple[Modality, ...] = tuple(Modality)


def float64(x: Tensor) -> Tensor:
    """``x`` detached, as float64, on a device that has float64 (MPS does not: the CPU).

    A float64 input comes back as the same storage, so callers never modify the result in place.
    """
    device = torch.device("cpu") if x.device.type == "mps" else x.device
    return x.detach().to(device=device, dtype=torch.float64)


def as_items(x: Tensor, name: str) -> Tensor:
    """(n, ...) -> (n, d) float64: one row per item (example), trailing dims flattened.

    The items of two representations compared by CKA or CCA must be the same examples in the same
    order; a (B, N, D) token representation is first pooled over N (or the tokens made the items,
    ``x.flatten(0, 1)``) by the caller, because different modalities have different N.
    """
    if x.ndim < 2:
        raise ValueError(f"{name} must be (n, d) items x features (or (n, ...), flattened), got shape {tuple(x.shape)}")
    return float64(x).flatten(1)  # (n, ...) -> (n, d)


def check_same_items(x: Tensor, y: Tensor, *, min_items: int = 2) -> None:
    """Both (n, .) with the same n >= ``min_items``; the message says what to pass instead."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} items and y {y.shape[0]}: compare the same examples, row for row")
    if x.shape[0] < min_items:
        raise ValueError(f"need at least {min_items} items (rows) for this estimate, got {x.shape[0]}")


def modality_ids(spans: Sequence[tuple[Modality, int]], *, device: torch.device | str | None = None) -> Tensor:
    """(N,) int64 modality id of each token of a concatenated layout, e.g. ``[(TEXT, 12), (IMAGE, 16)]``.

    Args:
        spans: (modality, number of tokens) in the order the tokens are concatenated.
        device: where to put the ids.

    Returns:
        (N,) ids indexing ``MODALITY_ORDER``, N the sum of the counts.
    """
    ids = [torch.full((count,), MODALITY_ORDER.index(modality), dtype=torch.int64) for modality, count in spans]
    if not ids:
        raise ValueError("spans is empty: give (modality, number of tokens) for each block of tokens")
    return torch.cat(ids).to(device)


def check_modality_ids(ids: Tensor, name: str = "token_modalities") -> None:
    """Integer ids inside ``MODALITY_ORDER``; a clear error otherwise."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer modality ids (indices into MODALITY_ORDER), got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(MODALITY_ORDER)):
        raise ValueError(
            f"{name} ids must lie in [0, {len(MODALITY_ORDER)}) (MODALITY_ORDER = "
            f"{[m.value for m in MODALITY_ORDER]}); got [{int(ids.min())}, {int(ids.max())}]"
        )
