"""Learnable queries (MetaQuery) through the shared backbone: they read the source and the source
never reads them; the empty condition is the queries over no source (equal to a fully padded one);
with ``train_backbone`` false their loss moves no backbone weight, yet reaches the queries."""

from __future__ import annotations

import torch
from batches import SHAPES, make_batch

from polymodal.config import load_config
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
    empty = queries.empty(model, source)  # (1, N, dim)
    torch.testing.assert_close(padded, empty.expand_as(padded), rtol=1e-5, atol=1e-5)


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
