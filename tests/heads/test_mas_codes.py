"""The ``mas_vq`` image head (``vq_codes`` told each position's caption token by MAS): MAS over an
image's pixel columns finds the token widths an image was built with, the margins going to [bos]
and [eos]; each position reads the token its column's centre falls in; a code's logits never read
that code or later ones, but do read the widths; the cached draw equals greedy filling with
everything recomputed; it learns a batch; seeded draws repeat; bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from batches import SHAPES, Fixed, make_batch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.heads.length_regulator import PHASE_BUCKETS, predicted_durations
from polymodal.heads.mas_codes import margin_columns
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

HEIGHT, WIDTH = SHAPES.image_size
GROUPS = ["group: [1, 1]", "group: [2, 2]"]


def _model(*settings: str):
    head = "{name: mas_vq" + "".join(", " + s for s in settings) + "}"
    config = load_config(["tiny"], ["model.tasks=[text_to_image]", f"model.heads.image={head}"])
    torch.manual_seed(0)
    return build_model(config, SHAPES).eval()


def _source(model):
    batch = make_batch()
    return model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])


def test_mas_finds_the_widths_an_image_was_drawn_with_and_the_edges_take_the_margins():
    """[bos], three tokens of 2 strokes each, [eos]; the image: a blank margin, each token's strokes
    over known widths, a blank margin. The prior layer gives each token its strokes in order (and
    nonsense for the edges, whose one mean is the image's own margin)."""
    torch.manual_seed(0)
    strokes = torch.rand(6, HEIGHT) * 2 - 1 + 3  # far from the blank -1
    stroke_widths = torch.tensor([5, 9, 12, 4, 20, 10])
    left, right = 13, WIDTH - 13 - int(stroke_widths.sum())
    widths = torch.cat([torch.tensor([left]), stroke_widths, torch.tensor([right])])
    blank = torch.full((1, HEIGHT), -1.0)
    columns = torch.repeat_interleave(torch.cat([blank, strokes, blank]), widths, dim=0)[None]  # (1, W, H)
    columns = columns + 0.05 * torch.randn_like(columns)
    head = _model("states_per_token: 2").head(Modality.IMAGE)
    head.prior_head = Fixed(torch.cat([torch.randn(1, 2 * HEIGHT), strokes.view(3, 2 * HEIGHT), torch.randn(1, 2 * HEIGHT)])[None])
    margin = (columns[:, :1] + columns[:, -1:]) / 2
    found, prior = head.aligned_durations(torch.zeros(1, 5, 8), torch.ones(1, 5, dtype=torch.bool), columns, torch.ones(1, WIDTH, dtype=torch.bool), margin)
    assert found.tolist() == [[left, 14, 16, 30, right]]
    assert prior < 0.01  # every column sits on its own mean


@pytest.mark.parametrize("group", GROUPS)
def test_each_position_reads_the_token_its_columns_centre_falls_in(group):
    head = _model(group).head(Modality.IMAGE)
    source = torch.randn(2, 4, head.column_phase_embed.embedding_dim)
    widths = torch.tensor([[10.0, 30.0, 50.0, 6.0], [40.0, 0.0, 56.0, 0.0]])
    aligned = head.aligned_inputs(source, widths)
    column_width = WIDTH / head.code_grid[1]
    for b in range(2):
        ends = widths[b].cumsum(0).tolist()
        for p in range(head.num_positions):
            column = int(head.to_sequence(torch.arange(head.code_grid[1]).expand(1, *head.code_grid))[0, p * head.group_size])
            centre = (column + 0.5) * column_width
            token = next(i for i, end in enumerate(ends) if centre < end)
            start = ends[token] - float(widths[b, token])
            phase = min(int((centre - start) / float(widths[b, token]) * PHASE_BUCKETS), PHASE_BUCKETS - 1)
            torch.testing.assert_close(aligned[b, p], source[b, token] + head.column_phase_embed.weight[phase])


@pytest.mark.parametrize("group", GROUPS)
def test_a_codes_logits_read_no_later_code_but_read_the_widths(group):
    model = _model(group)
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    torch.manual_seed(1)
    codes = torch.randint(0, head.num_codes, (len(source), head.num_positions * head.group_size))
    widths = valid.float() * 96 / valid.sum(1, keepdim=True)
    extra = head.aligned_inputs(source, widths)
    logits = head.code_logits(head.teacher_forced(model, source, valid, codes, extra)[:, source.shape[1] :], codes)
    cut = head.group_size * (head.num_positions // 2)
    changed = codes.clone()
    changed[:, cut:] = torch.randint(0, head.num_codes, changed[:, cut:].shape)
    again = head.code_logits(head.teacher_forced(model, source, valid, changed, extra)[:, source.shape[1] :], changed)
    torch.testing.assert_close(again[:, :cut], logits[:, :cut])
    moved = head.aligned_inputs(source, widths.roll(1, dims=1) * valid)
    other = head.code_logits(head.teacher_forced(model, source, valid, codes, moved)[:, source.shape[1] :], codes)
    assert not torch.allclose(other, logits, atol=1e-4)


@pytest.mark.parametrize("group", GROUPS)
def test_the_cached_draw_equals_greedy_filling_recomputed_at_every_position(group):
    model = _model(group, "temperature: 0.0")
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    drawn = head.generate_codes(model, source, valid)
    extra = head.aligned_inputs(source, predicted_durations(head.width_head, model, source, valid))
    g = head.group_size
    previous = torch.full((len(source), g), head.num_codes)
    for _ in range(head.num_positions):
        inputs = head.embed_inputs(model, previous, 0, extra)
        hidden = model.run(source, valid, inputs, torch.ones(inputs.shape[:2], dtype=torch.bool))[:, -1:]
        block = torch.zeros(len(source), g, dtype=torch.long)
        for slot in range(g):
            block[:, slot] = head.code_logits(hidden, block)[:, slot].argmax(-1)
        previous = torch.cat([previous, block], dim=1)
    assert torch.equal(drawn, head.to_grid(previous[:, g:]))


def test_it_learns_a_batch_of_images_from_their_captions():
    batch = make_batch()
    model = _model().train()
    head = model.head(Modality.IMAGE)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = {k: float(v.detach()) for k, v in model(batch).losses.items()}
    for _ in range(60):
        loss = sum(model(batch).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = {k: float(v.detach()) for k, v in model(batch).losses.items()}
    assert last["text_to_image"] < 0.5 * first["text_to_image"]
    assert last["text_to_image_prior"] < first["text_to_image_prior"]
    model.eval()
    source, valid = model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])
    codes = head.generate_codes(model, source, valid, temperature=0.0)
    assert (codes == head.tokenizer.encode(batch.inputs[Modality.IMAGE])).float().mean() > 0.5


def test_seeded_guided_draws_repeat_and_seeds_differ():
    model = _model("condition_dropout: 0.1", "guidance: 3.0", "top_k: 8")
    head = model.head(Modality.IMAGE)
    source, valid = _source(model)
    drawn = head.generate(model, source, valid, generator=torch.Generator().manual_seed(1))
    again = head.generate(model, source, valid, generator=torch.Generator().manual_seed(1))
    other = head.generate(model, source, valid, generator=torch.Generator().manual_seed(2))
    assert drawn.shape == (len(source), 1, HEIGHT, WIDTH) and torch.equal(drawn, again) and not torch.equal(drawn, other)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("states_per_token: 0", "states_per_token >= 1"),
        ("alignment_prior: -1.0", "alignment_prior >= 0"),
        ("margin_tolerance: -0.1", "margin_tolerance >= 0"),
        ("candidates: 4", "model.heads.image.candidates: unknown setting"),
        ("group: [3, 1]", "model.heads.image.group"),
    ],
)
def test_bad_settings_are_refused_with_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        _model(setting)


def test_it_reads_the_items_own_images_not_references():
    batch = make_batch()
    model = _model().train()
    assert not model.head(Modality.IMAGE).reads_references
    out = model(batch.__class__(batch.inputs, batch.masks, batch.present, batch.labels, {}))
    assert set(out.losses) == {"text_to_image", "text_to_image_width", "text_to_image_prior"}


def test_the_margins_go_to_bos_and_eos_even_when_a_tokens_first_stroke_is_blank():
    """The failure the margin rule fixes: a token whose first mean column is the blank one takes the
    left margin unless margins are only the edges'. ``margin_columns`` finds the leading and
    trailing blank runs, not the blank gap inside."""
    torch.manual_seed(0)
    blank = torch.full((1, HEIGHT), -1.0)
    ink = torch.rand(2, HEIGHT) + 1.0
    widths = torch.tensor([20, 10, 6, 10, 50])  # margin, ink, gap, ink, margin
    columns = torch.repeat_interleave(torch.cat([blank, ink[:1], blank, ink[1:], blank]), widths, dim=0)[None]
    edge = (columns[:, :1] + columns[:, -1:]) / 2
    margins = margin_columns(columns, edge, 0.01)
    assert margins[0].tolist() == [True] * 20 + [False] * 26 + [True] * 50
    head = _model("states_per_token: 2").head(Modality.IMAGE)
    means = torch.cat([torch.randn(1, 2 * HEIGHT), torch.cat([blank, ink[:1]], 1), torch.cat([blank, ink[1:]], 1), torch.randn(1, 2 * HEIGHT)])
    head.prior_head = Fixed(means[None])  # (1, 4, 2 H): each word a blank column, then its ink
    every, valid = torch.ones(1, WIDTH, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    free, _ = head.aligned_durations(torch.zeros(1, 4, 8), valid, columns, every, edge)
    kept, _ = head.aligned_durations(torch.zeros(1, 4, 8), valid, columns, every, edge, margins)
    assert free[0, 0] < 20  # the first word's blank state took most of the margin
    assert kept.tolist() == [[20, 10, 16, 50]]  # the gap goes to the second word, whose first column is blank
