"""The VQ-code image head (``vq_codes``) inside a small any-to-any model: its code order is a
permutation of the grid and back; a code's logits never read that code or later ones; generating
through the KV cache equals recomputing the whole sequence at every step; guidance at scale 0 is
sampling from the empty source; seeded draws repeat; reranking keeps the candidate with the largest
log-likelihood ratio, which equals per-item cross-entropies; and the head learns a batch's codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batches import SHAPES, make_batch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.heads import Targets
from polymodal.modality import Modality
from polymodal.models.architectures import build_model


def _model(*settings: str):
    extra = ", ".join(settings)
    config = load_config(["tiny"], ["model.tasks=[text_to_image]", f"model.heads.image={{name: vq_codes{', ' + extra if extra else ''}}}"])
    torch.manual_seed(0)
    return build_model(config, SHAPES).eval()


def _source(model):
    batch = make_batch()
    return model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])


def _recomputed_codes(model, source, valid) -> torch.Tensor:
    """Greedy codes with no cache: the whole [source][start, codes so far] through the backbone at each step."""
    head = model.head(Modality.IMAGE)
    previous = torch.full((len(source), 1), head.num_codes)
    for _ in range(head.num_positions):
        inputs = head.embed_inputs(model, previous, 0)
        hidden = model.run(source, valid, inputs, torch.ones_like(previous, dtype=torch.bool))
        previous = torch.cat([previous, head.code_head(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
    return head.to_grid(previous[:, 1:])


@pytest.mark.parametrize("order", ["columns", "raster"])
def test_the_code_order_is_a_permutation_of_the_grid(order):
    head = _model(f"order: {order}").head(Modality.IMAGE)
    height, width = head.code_grid
    grid = torch.arange(2 * height * width).reshape(2, height, width)
    sequence = head.to_sequence(grid)
    assert torch.equal(head.to_grid(sequence), grid)
    first_column = sequence[0, :height] if order == "columns" else sequence[0, ::width][:height]
    assert torch.equal(first_column, grid[0, :, 0])


def test_a_codes_logits_never_read_that_code_or_later_ones():
    model = _model()
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    codes = torch.randint(0, head.num_codes, (len(source), head.num_positions))
    changed = codes.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % head.num_codes
    start = torch.full_like(codes[:, :1], head.num_codes)
    every = torch.ones_like(codes, dtype=torch.bool)
    with torch.no_grad():
        outs = [
            model.run(source, valid, head.embed_inputs(model, torch.cat([start, c[:, :-1]], 1), 0), every)[:, source.shape[1] :]
            for c in (codes, changed)
        ]
    torch.testing.assert_close(outs[0][:, :11], outs[1][:, :11])  # position i predicts code i from codes < i
    assert not torch.allclose(outs[0][:, 11:], outs[1][:, 11:])


def test_cached_generation_equals_recomputing_every_step():
    model = _model("temperature: 0.0")
    source, valid = _source(model)
    cached = model.head(Modality.IMAGE).generate_codes(model, source, valid)
    assert torch.equal(cached, _recomputed_codes(model, source, valid))


def test_guidance_zero_samples_from_the_empty_source():
    model = _model("temperature: 0.0")
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    guided = head.generate_codes(model, source, valid, guidance=0.0)
    assert torch.equal(guided, _recomputed_codes(model, source, head.empty_source(valid)))
    assert not torch.equal(guided, head.generate_codes(model, source, valid))  # the source matters


def test_seeded_draws_repeat_and_differ_across_seeds():
    model = _model("temperature: 1.0")
    source, valid = _source(model)
    draw = [model.head(Modality.IMAGE).generate(model, source, valid, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert draw[0].shape == (len(source), 1, *SHAPES.image_size) and draw[0].abs().max() <= 1


def test_source_specificity_is_the_log_likelihood_ratio_by_per_item_cross_entropy():
    model = _model("condition_dropout: 0.1")
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    codes = torch.randint(0, head.num_codes, (len(source), head.num_positions), generator=torch.Generator().manual_seed(0))

    def log_likelihood(mask):  # one item at a time, through F.cross_entropy
        per_item = []
        for b in range(len(source)):
            with torch.no_grad():
                hidden = head.teacher_forced(model, source[b : b + 1], mask[b : b + 1], codes[b : b + 1])
            per_item.append(-F.cross_entropy(head.code_head(hidden[0, source.shape[1] :]), codes[b], reduction="sum"))
        return torch.stack(per_item)

    expected = log_likelihood(valid) - log_likelihood(head.empty_source(valid))
    torch.testing.assert_close(head.source_specificity(model, source, valid, codes), expected, rtol=1e-5, atol=1e-4)
    assert expected.abs().min() > 0  # the source changes every item's likelihood


def test_reranking_keeps_the_most_source_specific_of_the_candidates():
    k = 3
    model = _model("temperature: 1.0", "condition_dropout: 0.1", f"candidates: {k}")
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    kept = head.to_sequence(head.generate_codes(model, source, valid, generator=torch.Generator().manual_seed(5)))
    # The same draws made directly: candidate c of item b is row c * B + b.
    sources, masks = source.repeat(k, 1, 1), valid.repeat(k, 1)
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0, guidance=1.0, generator=torch.Generator().manual_seed(5))
    drawn = head.draw_sequences(model, sources, masks, **sampling)
    scores = head.source_specificity(model, sources, masks, drawn).view(k, len(source))
    candidates = drawn.view(k, len(source), -1)
    assert not torch.equal(candidates[0], candidates[1])  # there was a choice to make
    for b in range(len(source)):
        chosen = [c for c in range(k) if torch.equal(candidates[c, b], kept[b])]
        assert chosen and scores[chosen[0], b] == scores[:, b].max()

def test_the_head_learns_a_batchs_codes():
    model = _model("condition_dropout: 0.0").train()
    batch = make_batch()
    head = model.head(Modality.IMAGE)
    source_ids, source_mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    target = Targets(batch.inputs[Modality.IMAGE], None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        source, valid = model.encode(Modality.TEXT, source_ids, source_mask)
        out = head.loss(model, source, valid, target)
        out.losses[""].backward()
        optimizer.step()
    assert out.metrics["token_acc"] > 0.9  # the tiny tokenizer is untrained: any fixed codes will do
    model.eval()
    with torch.no_grad():
        source, valid = model.encode(Modality.TEXT, source_ids, source_mask)
        made = head.generate_codes(model, source, valid, temperature=0.0)
    wanted = head.tokenizer.encode(batch.inputs[Modality.IMAGE])
    assert (made == wanted).float().mean() > 0.9


def test_settings_out_of_range_name_the_key():
    with pytest.raises(ConfigError, match="order"):
        _model("order: spiral")
    with pytest.raises(ConfigError, match="condition_dropout"):
        _model("condition_dropout: 1.5")
    with pytest.raises(ConfigError, match="candidates"):
        _model("candidates: 0")
    with pytest.raises(ConfigError, match="candidates.*condition_dropout > 0"):
        _model("candidates: 4")  # nothing trained the empty source
