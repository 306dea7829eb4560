"""How sequences go through the backbone: the passes that let the transformer skip padded source
tokens give every state a head reads the values of a backbone that computes them all."""

from __future__ import annotations

import torch

from polymodal.backbones import BACKBONES
from polymodal.models.sequence import masked_mean, needed_tokens, prefix_lm_pass, source_pass

DIM = 32


class _Everything(torch.nn.Module):
    """The same backbone, seen as one that cannot skip padding (no ``skips_padding``)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, tokens, **kwargs):
        assert "needed" not in kwargs  # a backbone without the flag is never handed `needed`
        return self.backbone(tokens, **kwargs)


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    backbone = BACKBONES.build({"name": "transformer", "num_layers": 2, "num_heads": 4}, DIM).double()
    source = torch.randn(4, 7, DIM, dtype=torch.float64) * 10  # junk in the padding, too
    source_mask = torch.arange(7)[None] < torch.tensor([7, 3, 1, 5])[:, None]
    target = torch.randn(4, 5, DIM, dtype=torch.float64)
    target_mask = torch.arange(5)[None] < torch.tensor([5, 2, 4, 1])[:, None]
    return backbone, source, source_mask, target, target_mask


def test_prefix_lm_pass_keeps_every_state_heads_read():
    """Real source states and EVERY target position (a head may read a padded target position, which
    attends only itself) equal the full computation; only source padding is skipped."""
    backbone, source, source_mask, target, target_mask = _parts()
    assert needed_tokens(backbone, source_mask) == {"needed": source_mask}
    assert needed_tokens(_Everything(backbone), source_mask) == {}
    skipped = prefix_lm_pass(backbone, source, source_mask, target, target_mask)
    full = prefix_lm_pass(_Everything(backbone), source, source_mask, target, target_mask)
    read = torch.cat([source_mask, torch.ones_like(target_mask)], dim=1)  # (B, Ns + Lt)
    torch.testing.assert_close(skipped[read], full[read], rtol=1e-10, atol=1e-10)
    assert bool((skipped[~read] == 0).all())  # skipped source padding reads as zeros


def test_source_pass_and_its_masked_mean_are_unchanged():
    backbone, source, source_mask, _, _ = _parts(seed=1)
    skipped = source_pass(backbone, source, source_mask)
    full = source_pass(_Everything(backbone), source, source_mask)
    torch.testing.assert_close(skipped[source_mask], full[source_mask], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(masked_mean(skipped, source_mask), masked_mean(full, source_mask), rtol=1e-10, atol=1e-10)
