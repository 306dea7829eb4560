"""The LM head's label smoothing against a dense reference written here, and its settings' checks."""

from __future__ import annotations

import pytest
import torch

from polymodal.heads import HEADS, HeadWiring
from polymodal.heads.text import IGNORE_INDEX, token_loss

from batches import SHAPES


def _smoothed_reference(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Szegedy et al.'s target: 1 - eps on the label plus eps / V on every token, cross-entropy with
    log-softmax, averaged over the counted positions."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, L, V)
    counted = labels != IGNORE_INDEX
    vocab = logits.shape[-1]
    target = torch.full_like(logp, eps / vocab)
    target.scatter_add_(-1, labels.clamp(min=0)[..., None], torch.full_like(logp[..., :1], 1.0 - eps))
    per_position = -(target * logp).sum(-1)  # (B, L)
    return per_position[counted].mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_the_dense_reference(eps):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = IGNORE_INDEX
    loss, metrics = token_loss(logits, labels, label_smoothing=eps)
    assert loss.item() == pytest.approx(_smoothed_reference(logits, labels, eps).item(), rel=1e-6)
    assert 0.0 <= metrics["token_acc"] <= 1.0


def test_head_settings_are_checked():
    head = HEADS.build({"name": "lm", "label_smoothing": 0.1, "dropout": 0.2}, HeadWiring(16, SHAPES))
    assert head.label_smoothing == 0.1 and head.dropout.p == 0.2
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        HEADS.build({"name": "lm", "label_smoothing": 1.0}, HeadWiring(16, SHAPES))
