"""The ``flow_matching_codes`` head: one query per code column; its codes loss is the ``vq_codes``
head's own loss with the queries' final states as the whole source; that loss trains the queries,
backbone and text encoder while the flow loss reaches only the connector and the velocity network;
the frozen tokenizer is saved once; it samples images and names a tokenizer without codes at build
time."""

from __future__ import annotations

import pytest
import torch
from batches import SHAPES, make_batch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.heads import Targets
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

# The tiny preset's VQ-VAE: 3 downsamples of a 32 x 96 image, a 4 x 12 code grid of 32 codes.
HEAD = "{name: flow_matching_codes, patch_size: 8, dim_condition: 32, decoder: {name: unet, channels: 8, channel_mults: [1, 2], num_heads: 2}}"


def _model(*extra: str):
    config = load_config(["tiny"], ["model.tasks=[text_to_image]", f"model.heads.image={HEAD}", *extra])
    torch.manual_seed(0)
    return build_model(config, SHAPES)


def _source(model, batch):
    return model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])


def test_one_query_per_code_column():
    head = _model().head(Modality.IMAGE)
    assert head.teacher.code_grid == (4, 12)
    assert head.flow.queries.queries.shape[0] == 12


def _grads(model, loss: torch.Tensor) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()}


@pytest.mark.parametrize("condition_dropout", [0.0, 0.5])
def test_the_codes_train_the_text_path_and_the_flow_only_the_generator(condition_dropout):
    model = _model(f"model.heads.image.condition_dropout={condition_dropout}").train()
    torch.manual_seed(1)
    losses = model(make_batch()).losses
    flow, codes = _grads(model, losses["text_to_image_flow_matching"]), _grads(model, losses["text_to_image_codes"])

    def touched(grads: dict[str, bool], part: str) -> bool:
        return any(hit for name, hit in grads.items() if name.startswith(part))

    generator = ("heads.image.flow.network", "heads.image.flow.queries.connector")
    text_path = ("heads.image.flow.queries.queries", "backbone", "inputs")
    for part in generator:
        assert touched(flow, part) and not touched(codes, part), part
    for part in text_path:
        assert touched(codes, part) and not touched(flow, part), part
    assert touched(codes, "heads.image.teacher.code_embed") and not touched(flow, "heads.image.teacher")
    assert not touched(flow, "heads.image.teacher.tokenizer") and not touched(codes, "heads.image.teacher.tokenizer")


def test_the_sequence_teacher_reads_the_queries_states_as_its_source():
    model = _model().eval()
    head, batch = model.head(Modality.IMAGE), make_batch()
    source, mask = _source(model, batch)
    images = batch.inputs[Modality.IMAGE]
    with torch.no_grad():
        out = head.loss(model, source, mask, Targets(images, None))
        queries = out.hidden[:, source.shape[1] :]
        every = torch.ones(queries.shape[:2], dtype=torch.bool)
        direct = head.teacher.loss(model, queries, every, Targets(images, None))  # vq_codes' own loss on that source
        codes = head.teacher.to_sequence(head.tokenizer.encode(images))
        states = head.teacher.teacher_forced(model, queries, every, codes)[:, 12:]  # the code positions'
        others = head.teacher.teacher_forced(model, queries.flip(0), every, codes)[:, 12:]  # under other items' queries
        per_item = head.code_log_likelihood(model, source, mask, images)  # what candidates are ranked by
    torch.testing.assert_close(out.losses["codes"], direct.losses[""])
    torch.testing.assert_close(-per_item.mean() / 48, out.losses["codes"])  # 4 items x 48 codes
    assert (states - others).abs().amax(dim=(1, 2)).min() > 1e-3  # every item's codes read its queries' states
    assert head.teacher.num_positions == 12  # one backbone position per code column


def test_the_tokenizer_is_the_teachers_and_saved_once():
    model = _model()
    head = model.head(Modality.IMAGE)
    assert model.image_tokenizer is head.teacher.tokenizer
    keys = [key for key in model.state_dict() if ".tokenizer." in key]
    assert keys and all(key.startswith("heads.image.teacher.tokenizer.") for key in keys)


def test_it_samples_images_in_range():
    model = _model().eval()
    batch = make_batch()
    images = model.generate(Modality.TEXT, Modality.IMAGE, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT], steps=2)
    assert images.shape == (4, 1, 32, 96) and images.abs().max() <= 1.0


def test_a_tokenizer_without_codes_is_named():
    with pytest.raises(ConfigError, match="model.image_tokenizer: {name: vqvae}"):
        _model("model.image_tokenizer={name: vae, channels: 16, num_downsamples: 3, num_res_blocks: 1, dim: 4}")


def test_candidates_keep_the_image_whose_codes_the_teacher_finds_likeliest():
    model = _model("model.heads.image.candidates=3").eval()
    head, batch = model.head(Modality.IMAGE), make_batch()
    source, mask = _source(model, batch)
    with torch.no_grad():
        kept = head.generate(model, source, mask, steps=2, generator=torch.Generator().manual_seed(5))
        # The same noise by hand: 3 candidates for each of the 4 items, each item's scores compared.
        sources, masks = source.repeat(3, 1, 1), mask.repeat(3, 1)
        drawn = head.flow.sample(model, sources, masks, steps=2, sampler=None, guidance=None, generator=torch.Generator().manual_seed(5))
        scores = head.code_log_likelihood(model, sources, masks, drawn.clamp(-1, 1)).view(3, 4)
    assert kept.shape == (4, 1, 32, 96)
    for item in range(4):
        torch.testing.assert_close(kept[item], drawn[int(scores[:, item].argmax()) * 4 + item].clamp(-1, 1))
    assert len({round(float(x), 3) for x in scores.flatten()}) > 1  # the candidates differ


def test_candidates_must_be_a_positive_count():
    with pytest.raises(ConfigError, match="model.heads.image.candidates"):
        _model("model.heads.image.candidates=0")
