"""Contrastive negatives from every rank: the InfoNCE shares of 2 ranks (gloo), each holding its rows
and every rank's rows gathered with gradients, average to the one-process dense loss, and their
gradients (averaged over ranks, as DDP does) equal the dense gradients, for equal and unequal
splits, a rank with no rows, the tiled form, and labels whose repeats are dropped across ranks."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
from ranks import contrastive_inputs, gathered_contrastive, run_ranks  # noqa: E402

from polymodal.distributed.contrastive import first_of_label
from polymodal.losses.contrastive import info_nce_dense

CASES = [  # rows per rank, unique_labels, tile_size
    ([5, 5], False, None),
    ([7, 3], True, None),
    ([6, 4], True, 3),
    ([8, 0], False, 3),
]


def dense_reference(num: int, unique_labels: bool) -> dict[str, torch.Tensor]:
    a, b, labels, scale = contrastive_inputs(num)
    a, b = a.requires_grad_(), b.requires_grad_()
    keep = first_of_label(labels) if unique_labels else torch.ones(num, dtype=torch.bool)
    loss = info_nce_dense(a[keep], b[keep], scale)
    loss.backward()
    return {"loss": loss.detach(), "grad_a": a.grad, "grad_b": b.grad, "grad_scale": scale.grad}


@pytest.mark.parametrize(("splits", "unique_labels", "tile_size"), CASES)
def test_gathered_shares_equal_the_dense_loss_and_gradients(tmp_path, splits, unique_labels, tile_size):
    run_ranks(gathered_contrastive, len(splits), splits, unique_labels, tile_size, tmp_path)
    shares = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(splits))]
    expected = dense_reference(sum(splits), unique_labels)
    torch.testing.assert_close(torch.stack([s["loss"] for s in shares]).mean(), expected["loss"], rtol=0, atol=1e-12)
    for key in ("grad_a", "grad_b"):
        torch.testing.assert_close(torch.cat([s[key] for s in shares]), expected[key], rtol=0, atol=1e-12)
    for share in shares:
        torch.testing.assert_close(share["grad_scale"], expected["grad_scale"], rtol=0, atol=1e-12)
