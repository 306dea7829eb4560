"""The VQ-code image head (``vq_codes``) inside a small any-to-any model: its code order is a
permutation of the grid and back; a code's logits never read that code or later ones; generating
through the KV cache equals recomputing the whole sequence at every step; guidance at scale 0 is
sampling from the empty source; seeded draws repeat; reranking keeps the candidate with the largest
log-likelihood ratio, which equals per-item cross-entropies; and the head learns a batch's codes.
Each holds with blocks of codes per position (``group``) too, where the cached, code-by-code draw
is checked against greedy filling through the teacher-forced logits."""

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


GROUPS = ["group: [1, 1]", "group: [2, 2]", "group: [1, 3]"]


def _recomputed_codes(model, source, valid) -> torch.Tensor:
    """Greedy codes with no cache: the whole [source][start, blocks so far] through the backbone at
    each position, then the block's codes filled one at a time through the teacher-forced logits
    (slot j's logits read slots < j only, so the unfilled zeros after it do not matter)."""
    head = model.head(Modality.IMAGE)
    g = head.group_size
    previous = torch.full((len(source), g), head.num_codes)
    for _ in range(head.num_positions):
        inputs = head.embed_inputs(model, previous, 0)
        hidden = model.run(source, valid, inputs, torch.ones(inputs.shape[:2], dtype=torch.bool))[:, -1:]
        block = torch.zeros(len(source), g, dtype=torch.long)
        for slot in range(g):
            block[:, slot] = head.code_logits(hidden, block)[:, slot].argmax(-1)
        previous = torch.cat([previous, block], dim=1)
    return head.to_grid(previous[:, g:])


@pytest.mark.parametrize("order", ["columns", "raster"])
def test_the_code_order_is_a_permutation_of_the_grid(order):
    head = _model(f"order: {order}").head(Modality.IMAGE)
    height, width = head.code_grid
    grid = torch.arange(2 * height * width).reshape(2, height, width)
    sequence = head.to_sequence(grid)
    assert torch.equal(head.to_grid(sequence), grid)
    first_column = sequence[0, :height] if order == "columns" else sequence[0, ::width][:height]
    assert torch.equal(first_column, grid[0, :, 0])


@pytest.mark.parametrize("order", ["columns", "raster"])
def test_blocks_of_codes_are_read_whole_in_order(order):
    head = _model(f"order: {order}", "group: [2, 3]").head(Modality.IMAGE)
    height, width = head.code_grid
    grid = torch.arange(height * width).reshape(1, height, width)
    sequence = head.to_sequence(grid)
    assert torch.equal(head.to_grid(sequence), grid)
    blocks = sequence.view(head.num_positions, 6)
    # Every position's block is one 2 x 3 tile of the grid, its codes in the order's own direction.
    tile = grid[0, :2, :3]
    assert torch.equal(blocks[0], (tile.T if order == "columns" else tile).flatten())
    second = grid[0, 2:4, :3] if order == "columns" else grid[0, :2, 3:6]
    assert torch.equal(blocks[1], (second.T if order == "columns" else second).flatten())


@pytest.mark.parametrize("group", GROUPS)
def test_a_codes_logits_never_read_that_code_or_later_ones(group):
    model = _model(group)
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    codes = torch.randint(0, head.num_codes, (len(source), head.num_positions * head.group_size))
    logits = []
    for cut in (10, 11):  # codes from index `cut` on changed
        changed = codes.clone()
        changed[:, cut:] = (changed[:, cut:] + 1) % head.num_codes
        with torch.no_grad():
            hidden = head.teacher_forced(model, source, valid, changed)[:, source.shape[1] :]
            logits.append(head.code_logits(hidden, changed))
    with torch.no_grad():
        hidden = head.teacher_forced(model, source, valid, codes)[:, source.shape[1] :]
        unchanged = head.code_logits(hidden, codes)
    for cut, changed in zip((10, 11), logits):
        torch.testing.assert_close(changed[:, : cut + 1], unchanged[:, : cut + 1])  # code i's logits read codes < i
        assert not torch.allclose(changed[:, cut + 1 :], unchanged[:, cut + 1 :])


@pytest.mark.parametrize("group", GROUPS)
def test_cached_generation_equals_recomputing_every_step(group):
    model = _model("temperature: 0.0", group)
    source, valid = _source(model)
    cached = model.head(Modality.IMAGE).generate_codes(model, source, valid)
    assert torch.equal(cached, _recomputed_codes(model, source, valid))


@pytest.mark.parametrize("group", GROUPS[:2])
def test_guidance_zero_samples_from_the_empty_source(group):
    model = _model("temperature: 0.0", group)
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


@pytest.mark.parametrize("group", GROUPS[:2])
def test_source_specificity_is_the_log_likelihood_ratio_by_per_item_cross_entropy(group):
    model = _model("condition_dropout: 0.1", group)
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    size = (len(source), head.num_positions * head.group_size)
    codes = torch.randint(0, head.num_codes, size, generator=torch.Generator().manual_seed(0))

    def log_likelihood(mask):  # one item at a time, through F.cross_entropy
        per_item = []
        for b in range(len(source)):
            with torch.no_grad():
                hidden = head.teacher_forced(model, source[b : b + 1], mask[b : b + 1], codes[b : b + 1])
            logits = head.code_logits(hidden[:, source.shape[1] :], codes[b : b + 1])[0]
            per_item.append(-F.cross_entropy(logits, codes[b], reduction="sum"))
        return torch.stack(per_item)

    expected = log_likelihood(valid) - log_likelihood(head.empty_source(valid))
    torch.testing.assert_close(head.source_specificity(model, source, valid, codes), expected, rtol=1e-5, atol=1e-4)
    assert expected.abs().min() > 0  # the source changes every item's likelihood


@pytest.mark.parametrize("group", GROUPS[:2])
def test_reranking_keeps_the_most_source_specific_of_the_candidates(group):
    k = 3
    model = _model("temperature: 1.0", "condition_dropout: 0.1", f"candidates: {k}", group)
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


@pytest.mark.parametrize("group", GROUPS[:2])
def test_the_head_learns_a_batchs_codes(group):
    model = _model("condition_dropout: 0.0", group).train()
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
    for group in ("[3, 1]", "[0, 2]", "[2]", "[1.5, 2]"):  # the tiny grid is 4 x 12
        with pytest.raises(ConfigError, match=r"model.heads.image.group.*divide the VQ-VAE's code grid \[4, 12\]"):
            _model(f"group: {group}")
