"""Stochastic depth: identity at evaluation; in training each item's branch is either dropped or
scaled by 1 / keep (so its expectation is the branch); the linear rule over depth; a backbone with
stochastic depth computes, in eval mode, exactly what the same weights without it compute."""

from __future__ import annotations

import pytest
import torch

from polymodal.backbones.transformer import TransformerBackbone
from polymodal.layers.drop_path import DropPath, linear_rates


def test_eval_is_the_identity_and_training_drops_whole_items():
    x = torch.randn(64, 5, 3)
    layer = DropPath(0.25)
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(0)
    out = layer.train()(x)
    dropped = (out == 0).flatten(1).all(1)  # (B,)
    kept = torch.isclose(out, x / 0.75).flatten(1).all(1)
    assert bool((dropped ^ kept).all())  # every item one or the other, never a mix
    assert 0 < int(dropped.sum()) < 64


def test_the_expectation_is_the_branch():
    torch.manual_seed(1)
    x = torch.randn(8, 4)
    layer = DropPath(0.3).train()
    mean = torch.stack([layer(x) for _ in range(20000)]).mean(0)
    assert torch.allclose(mean, x, atol=0.03)


def test_linear_rule_and_bad_rates():
    assert linear_rates(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert linear_rates(0.2, 1) == [0.2]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_a_backbone_with_stochastic_depth_evaluates_as_one_without():
    torch.manual_seed(2)
    plain = TransformerBackbone(32, num_layers=3, num_heads=4)
    deep = TransformerBackbone(32, num_layers=3, num_heads=4, drop_path=0.3)
    deep.load_state_dict(plain.state_dict())  # no new parameters: the state dicts match
    tokens = torch.randn(2, 7, 32)
    assert torch.equal(deep.eval()(tokens), plain.eval()(tokens))
    assert [b.drop_path.rate for b in deep.blocks] == pytest.approx([0.0, 0.15, 0.3])
    deep.train()
    torch.manual_seed(3)
    assert not torch.equal(deep(tokens), plain.train()(tokens))
