"""Learnable queries (MetaQuery) through the shared backbone: they read the source and the source
never reads them; the empty condition is the queries over no source (equal to a fully padded one);
with ``train_backbone`` false their loss moves no backbone weight, yet reaches the queries. With
``read_source`` the condition is the source's own states then the queries', padding masked and
zero: extra padding changes no real token, and the empty condition's source slots are padding."""

from __future__ import annotations

import pytest
import torch
from batches import SHAPES, make_batch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.architectures import build_model


def _model(**settings):
    head = ", ".join(f"{k}: {v}" for k, v in {"name": "flow_matching", "patch_size": 8, **settings}.items())
    config = load_config(["tiny"], ["model.tasks=[text_to_image, contrastive]", f"model.heads.image={{{head}}}"])
    torch.manual_seed(0)
    return build_model(config, SHAPES)


def _source(model):
    batch = make_batch()
    return model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])


def test_queries_read_the_source_and_the_source_never_reads_them():
    model = _model()
    queries = model.head(Modality.IMAGE).flow.queries
    source, mask = _source(model)
    made = queries(model, source, mask)
    alone = model.source_states(source, mask)
    num_source = source.shape[1]
    torch.testing.assert_close(made.hidden[:, :num_source][mask], alone[mask], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        queries.queries.mul_(-3.0)  # other queries: the source states stay, the condition moves
    again = queries(model, source, mask)
    torch.testing.assert_close(again.hidden[:, :num_source][mask], alone[mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(again.condition, made.condition)
    other = queries(model, source.flip(0), mask.flip(0))  # another source for every item: another condition
    assert not torch.allclose(other.condition, again.condition)


def test_the_empty_condition_is_the_queries_over_a_fully_padded_source():
    model = _model()
    queries = model.head(Modality.IMAGE).flow.queries
    source, mask = _source(model)
    padded = queries(model, source, torch.zeros_like(mask)).condition  # (B, N, dim): no real source token
    empty = queries.empty(model, source)
    assert empty.mask is None and empty.hidden.shape[1] == len(queries.queries)
    torch.testing.assert_close(padded, empty.condition.expand_as(padded), rtol=1e-5, atol=1e-5)  # (B, N, dim)


def test_a_frozen_backbone_passes_gradients_to_the_queries_only():
    frozen, trained = _model(train_backbone="false"), _model(train_backbone="true")
    trained.load_state_dict(frozen.state_dict())
    source, mask = _source(frozen)
    a = frozen.head(Modality.IMAGE).flow.queries(frozen, source, mask)
    b = trained.head(Modality.IMAGE).flow.queries(trained, *_source(trained))
    torch.testing.assert_close(a.condition, b.condition, rtol=1e-5, atol=1e-5)  # the same function
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
    a.condition.square().sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in frozen.backbone.parameters())
    assert all(p.grad is None or not p.grad.any() for p in frozen.inputs.parameters())
    assert frozen.head(Modality.IMAGE).flow.queries.queries.grad.abs().sum() > 0
    # The source states it hands to other tasks (the contrastive task pools them) still train the backbone.
    frozen.zero_grad()
    a = frozen.head(Modality.IMAGE).flow.queries(frozen, *_source(frozen))
    a.hidden[:, : source.shape[1]].square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen.backbone.parameters())


def _pad(source, mask, extra: int = 3):
    """The source with ``extra`` loud padded tokens after it: (B, Ns + extra, D), (B, Ns + extra)."""
    noise = 5.0 * torch.randn(len(source), extra, source.shape[-1], generator=torch.Generator().manual_seed(1))
    return torch.cat([source, noise], dim=1), torch.cat([mask, mask.new_zeros(len(mask), extra)], dim=1)


@pytest.mark.parametrize("connector", ["{name: mlp}", "{name: transformer, num_layers: 1}"])
def test_read_source_puts_the_sources_own_states_before_the_queries(connector):
    model = _model(read_source="true", connector=connector)
    queries = model.head(Modality.IMAGE).flow.queries
    source, mask = _source(model)
    made = queries(model, source, mask)
    num_source, num_queries = source.shape[1], len(queries.queries)
    assert made.condition.shape[1] == num_source + num_queries
    assert torch.equal(made.mask, torch.cat([mask, torch.ones(len(mask), num_queries, dtype=torch.bool)], dim=1))
    assert not made.condition[~made.mask].any()  # the source's padding is exactly zero
    # The same condition written out: the connector over [the source's states alone][the queries' states].
    states = torch.cat([model.source_states(source, mask), made.hidden[:, num_source:]], dim=1)
    expected = queries.connector(states, made.mask)
    torch.testing.assert_close(made.condition[made.mask], expected[made.mask], rtol=1e-5, atol=1e-5)
    # Extra padding after the source changes none of the real condition tokens.
    padded = queries(model, *_pad(source, mask))
    torch.testing.assert_close(padded.condition[padded.mask], made.condition[made.mask], rtol=1e-5, atol=1e-5)
    # The empty condition: the queries over no source, behind as many padded (zero) source slots.
    empty, bare = queries.empty(model, source, num_source=num_source), queries.empty(model, source)
    assert torch.equal(empty.mask, torch.cat([torch.zeros(1, num_source, dtype=torch.bool), torch.ones(1, num_queries, dtype=torch.bool)], dim=1))
    assert torch.equal(empty.condition[:, num_source:], bare.condition) and not empty.condition[:, :num_source].any()
    fully_padded = queries(model, source, torch.zeros_like(mask))
    torch.testing.assert_close(fully_padded.condition, empty.condition.expand_as(fully_padded.condition), rtol=1e-5, atol=1e-5)


def test_read_source_off_is_the_queries_alone():
    model = _model()
    queries = model.head(Modality.IMAGE).flow.queries
    source, mask = _source(model)
    made = queries(model, source, mask)
    assert made.mask is None and made.condition.shape[1] == len(queries.queries)
    assert torch.equal(made.condition, queries.connector(made.hidden[:, source.shape[1] :]))
    assert queries.empty(model, source, num_source=source.shape[1]).condition.shape[1] == len(queries.queries)


def test_a_bad_read_source_is_named_at_config_load():
    with pytest.raises(ConfigError, match="model.heads.image.read_source: 'maybe' is not a valid bool"):
        load_config(["tiny"], ["model.tasks=[text_to_image]", "model.heads.image={name: flow_matching, read_source: maybe}"])
