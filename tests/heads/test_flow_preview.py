"""The flow image head's coarse preview (``preview: f``): its loss is the MSE to the image's f x f
block means, it trains the backbone through the queries while the flow loss stops at the connector
(``train_backbone: false``), and the U-Net reads it, upsampled and detached, beside the noisy image,
the empty condition's preview for a dropped item."""

from __future__ import annotations

import pytest
import torch
from batches import SHAPES, make_batch
from einops import rearrange
from torch import nn

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

UNET = "{name: unet, channels: 8, channel_mults: [1, 2], num_heads: 2}"


def _head(**settings) -> str:
    extra = "".join(f", {key}: {value}" for key, value in settings.items())
    return f"{{name: flow_matching, patch_size: 4, num_queries: 4, dim_condition: 32, read_source: true, decoder: {UNET}{extra}}}"


def _model(head: str):
    config = load_config(["tiny"], ["model.tasks=[text_to_image]", f"model.heads.image={head}"])
    torch.manual_seed(0)
    return build_model(config, SHAPES)


def _source(model, batch):
    return model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])


def test_the_preview_loss_is_the_mse_to_the_block_means():
    model = _model(_head(preview=4, train_backbone="false"))
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = _source(model, batch)
    images = batch.inputs[Modality.IMAGE]  # (B, 1, 32, 96)
    terms = flow.loss(model, source, valid, images)[1]
    assert set(terms) == {"flow_matching", "preview"}
    means = images.reshape(len(images), 1, 8, 4, 24, 4).mean(dim=(3, 5))  # block means written out
    preview = flow.preview_of(flow.queries(model, source, valid).taught)
    assert preview.shape == means.shape
    torch.testing.assert_close(terms["preview"], ((preview - means) ** 2).mean())
    assert "text_to_image_preview" in model(batch).losses


def _grads(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_the_preview_trains_the_backbone_and_the_flow_loss_stops_at_the_connector():
    model = _model(_head(preview=4, train_backbone="false", condition_dropout=0.0))
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = _source(model, batch)
    terms = flow.loss(model, source, valid, batch.inputs[Modality.IMAGE])[1]
    terms["flow_matching"].backward(retain_graph=True)
    assert _grads(model.backbone) == 0.0 and _grads(model.inputs.encoders) == 0.0 and flow.queries.queries.grad is None
    assert _grads(flow.preview_map) == 0.0  # the U-Net reads the preview detached
    assert _grads(flow.queries.connector) > 0.0 and _grads(flow.network) > 0.0
    model.zero_grad(set_to_none=True)
    terms["preview"].backward()
    assert _grads(model.backbone) > 0.0 and _grads(model.inputs.encoders) > 0.0 and float(flow.queries.queries.grad.abs().sum()) > 0.0
    assert _grads(flow.network) == 0.0


def test_without_a_preview_nothing_changes():
    model = _model(_head(train_backbone="false"))
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = _source(model, batch)
    assert flow.preview_map is None and flow.queries(model, source, valid).taught is None
    assert set(flow.loss(model, source, valid, batch.inputs[Modality.IMAGE])[1]) == {"flow_matching"}


class _GuideSpy(nn.Module):
    """Stands in for the U-Net: keeps the condition and guide it is given, answers zeros."""

    def forward(self, tokens, t, *, context=None, context_mask=None, guide=None):
        self.context, self.guide = context, guide
        return torch.zeros_like(tokens)


def test_the_unet_reads_the_upsampled_preview_and_a_dropped_item_the_empty_ones():
    model = _model(_head(preview=4, condition_dropout=0.5))
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = _source(model, batch)
    made, empty = flow.queries(model, source, valid), flow.queries.empty(model, source, num_source=source.shape[1])
    network, flow.network = flow.network, _GuideSpy()
    torch.manual_seed(2)
    flow.loss(model, source, valid, batch.inputs[Modality.IMAGE])
    kinds = set()
    for i in range(len(source)):
        dropped = torch.equal(flow.network.context[i], empty.condition[0])
        condition = (empty if dropped else made).condition[i if not dropped else 0][None]
        coarse = flow.preview_of(condition).detach()  # (1, 1, 8, 24)
        upsampled = nn.functional.interpolate(coarse, size=(32, 96), mode="bilinear", align_corners=False)
        expected = rearrange(upsampled, "b c (h p) (w q) -> b (h w) (c p q)", p=4, q=4)[0]
        torch.testing.assert_close(flow.network.guide[i], expected)
        kinds.add("dropped" if dropped else "kept")
    assert kinds == {"dropped", "kept"}
    # The real U-Net's velocity moves with the preview (every weight woken so the guide reaches it).
    flow.network = network
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        x, t = torch.randn(2, *flow.shape), torch.rand(2)
        before = flow.velocity(x, t, made.condition[:2], made.mask[:2])
        flow.preview_map.bias.add_(1.0)
        assert not torch.allclose(flow.velocity(x, t, made.condition[:2], made.mask[:2]), before)


def test_a_unet_built_with_a_guide_needs_one_and_one_without_refuses_it():
    flow = _model(_head(preview=4)).head(Modality.IMAGE).flow
    tokens, t = torch.randn(2, 8 * 24, 16), torch.rand(2)
    context = torch.randn(2, 3, 32)
    with pytest.raises(ValueError, match="guide"):
        flow.network(tokens, t, context=context)
    plain = _model(_head()).head(Modality.IMAGE).flow
    with pytest.raises(ValueError, match="guide"):
        plain.network(tokens, t, context=context, guide=tokens)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"preview": 4, "decoder": "{dim: 32, num_layers: 1, num_heads: 2}"}, "model.heads.image.preview"), ({"preview": 5}, "divides")],
)
def test_a_bad_preview_is_named_at_config_load(settings, message):
    head = _head(**{k: v for k, v in settings.items() if k != "decoder"})
    if "decoder" in settings:
        head = head.replace(f"decoder: {UNET}", f"decoder: {settings['decoder']}")
    with pytest.raises(ConfigError, match=message):
        _model(head)
