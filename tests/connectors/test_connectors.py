"""Every registered connector: shape, builds on meta alike, a gradient on every parameter, a
state-dict round trip; the transformer connector is permutation-equivariant (no positions)."""

from __future__ import annotations

import pytest
import torch

from polymodal.connectors import CONNECTORS
from polymodal.models.architectures import on_meta

DIM_IN, DIM_OUT = 32, 24


@pytest.mark.parametrize("name", CONNECTORS.names())
def test_connector_conforms(name):
    build = lambda: CONNECTORS.build({"name": name}, DIM_IN, DIM_OUT)  # noqa: E731
    with on_meta():
        meta = build()
    torch.manual_seed(0)
    connector = build()
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in connector.named_parameters()}
    tokens = torch.randn(3, 5, DIM_IN)
    out = connector(tokens)
    assert out.shape == (3, 5, DIM_OUT) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    clone = build()
    clone.load_state_dict(connector.state_dict())
    torch.testing.assert_close(clone(tokens), connector(tokens), rtol=0, atol=0)


def test_transformer_connector_is_permutation_equivariant():
    torch.manual_seed(1)
    connector = CONNECTORS.build({"name": "transformer", "num_layers": 2, "num_heads": 4}, DIM_IN, DIM_OUT)
    tokens = torch.randn(2, 6, DIM_IN)
    order = torch.randperm(6)
    torch.testing.assert_close(connector(tokens[:, order]), connector(tokens)[:, order], rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_setting():
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match="connector.num_layers: unknown setting of connector 'mlp'"):
        CONNECTORS.build({"name": "mlp", "num_layers": 2}, DIM_IN, DIM_OUT, where="connector")
    with pytest.raises(ConfigError, match="num_layers must be >= 1"):
        CONNECTORS.build({"name": "transformer", "num_layers": 0}, DIM_IN, DIM_OUT)
