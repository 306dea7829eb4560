"""The any-to-any model: cached vs uncached generation, padding invariance, a learning step."""

from __future__ import annotations

import math

import torch

from batches import assert_task_pass_embeddings_equal_embed

from polymodal.config import load_config
from polymodal.data.batch import AlignedTargets, Batch
from polymodal.modality import Modality
from polymodal.heads.aligned_mel import SILENCE
from polymodal.heads.length_regulator import PHASE_BUCKETS, align_frames, predicted_durations
from polymodal.models.architectures import build_model
from polymodal.models.shapes import DataShapes, TextSpecials

VOCAB = 40
SPECIALS = TextSpecials(vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2)
MEL_CENTER, MEL_SCALE = -8.0, 6.0
SHAPES = DataShapes(
    image_size=(32, 96), num_mels=16, text=SPECIALS, num_audio_frames=50, log_mel_center=MEL_CENTER, log_mel_scale=MEL_SCALE
)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    config = load_config(["tiny"])
    return build_model(config, SHAPES).eval()


def make_batch(batch_size: int = 3, text_len: int = 6, frames: int = 30) -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch_size, text_len), generator=g)
    ids[:, 0] = SPECIALS.bos_id
    text_mask = torch.ones(batch_size, text_len, dtype=torch.bool)
    text_mask[0, 4:] = False
    ids[0, 4:] = SPECIALS.pad_id
    audio_mask = torch.ones(batch_size, frames, dtype=torch.bool)
    audio_mask[1, 20:] = False
    present = {m: torch.ones(batch_size, dtype=torch.bool) for m in (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)}
    # References: the same ids as their source text; audio 3-5 frames per content token, 0 on bos,
    # eos and padding; images 96 pixel columns shared among the real tokens.
    durations = torch.randint(3, 6, (batch_size, text_len), generator=g).float()
    durations[:, 0] = 0.0
    durations[:, -1] = 0.0
    durations[~text_mask] = 0.0
    speech_frames = int(durations.sum(1).max())
    speech_mask = torch.arange(speech_frames)[None, :] < durations.sum(1)[:, None]
    every = torch.ones(batch_size, dtype=torch.bool)
    speech = AlignedTargets(
        ids=ids,
        mask=text_mask,
        durations=durations,
        values=torch.randn(batch_size, speech_frames, 16, generator=g).masked_fill(~speech_mask[:, :, None], 0.0),
        value_mask=speech_mask,
        present=every,
    )
    widths = text_mask.float() * torch.rand(batch_size, text_len, generator=g)
    drawing = AlignedTargets(
        ids=ids,
        mask=text_mask,
        durations=96 * widths / widths.sum(1, keepdim=True),
        values=torch.rand(batch_size, 1, 32, 96, generator=g) * 2 - 1,
        value_mask=torch.ones(batch_size, 96, dtype=torch.bool),
        present=every,
    )
    return Batch(
        inputs={
            Modality.IMAGE: torch.randn(batch_size, 1, 32, 96, generator=g),
            Modality.TEXT: ids,
            Modality.AUDIO: torch.randn(batch_size, frames, 16, generator=g),
        },
        masks={Modality.TEXT: text_mask, Modality.AUDIO: audio_mask},
        present=present,
        labels=torch.arange(batch_size),
        references={Modality.AUDIO: speech, Modality.IMAGE: drawing},
    )


def test_cached_generation_equals_full_recomputation():
    model = tiny_model()
    batch = make_batch()
    for modality in (Modality.IMAGE, Modality.AUDIO):
        mask = batch.masks.get(modality)
        kwargs = dict(max_new_tokens=12, temperature=0.0)
        cached = model.generate(modality, Modality.TEXT, batch.inputs[modality], mask, use_cache=True, **kwargs)
        full = model.generate(modality, Modality.TEXT, batch.inputs[modality], mask, use_cache=False, **kwargs)
        assert cached == full
        assert all(len(ids) > 0 for ids in cached)


def test_padding_a_batch_does_not_change_an_items_logits():
    model = tiny_model()
    batch = make_batch()
    audio, audio_mask = batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]
    ids, text_mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    head = model.head(Modality.TEXT)
    with torch.no_grad():
        source, source_mask = model.encode(Modality.AUDIO, audio, audio_mask)
        batched = head.logits(model, source, source_mask, ids, text_mask)
        # Item 1 alone, cut to its 20 real frames (no padding at all).
        alone_source, alone_mask = model.encode(Modality.AUDIO, audio[1:2, :20], audio_mask[1:2, :20])
        alone = head.logits(model, alone_source, alone_mask, ids[1:2], text_mask[1:2])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_loss_is_named_per_task_and_falls_with_training():
    model = tiny_model().train()
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)
    pairs = {"contrastive_image_text", "contrastive_audio_text", "contrastive_image_audio"}
    tasks = {"image_to_text", "audio_to_text", "text_to_image", "text_to_audio"}
    tasks |= {"text_to_image_width", "text_to_audio_duration"}
    assert set(first.losses) == {*tasks, *pairs}
    assert 0.0 <= first.metrics["image_to_text_token_acc"] <= 1.0
    for _ in range(50):
        loss = sum(model(batch).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = model(batch)
    for task in first.losses:
        assert last.losses[task] < 0.5 * first.losses[task]


def test_a_batch_without_the_source_modality_skips_that_task():
    model = tiny_model()
    batch = make_batch()
    del batch.inputs[Modality.AUDIO]
    del batch.references[Modality.AUDIO]
    assert set(model(batch).losses) == {"image_to_text", "text_to_image", "text_to_image_width", "contrastive_image_text"}


def test_image_codes_come_from_one_pass_and_decode_to_images():
    model = tiny_model()
    batch = make_batch()
    ids, mask = batch.references[Modality.IMAGE].ids, batch.references[Modality.IMAGE].mask
    head = model.head(Modality.IMAGE)
    source, source_mask = model.encode(Modality.TEXT, ids, mask)
    codes = head.generate_codes(model, source, source_mask)
    assert codes.shape == (3, 4, 12)  # 32 x 96 at 8x downsampling
    assert 0 <= int(codes.min()) and int(codes.max()) < head.num_codes
    # The same codes as the most likely ones of the training pass, given the widths it predicted.
    with torch.no_grad():
        widths = predicted_durations(head.width_head, model, source, source_mask)
        tokens = head.code_tokens(model, source, widths)
        hidden = model.run(source, source_mask, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
        expected = head.code_head(hidden[:, source.shape[1] :]).argmax(-1).reshape(3, 4, 12)
    assert torch.equal(codes, expected)
    images = model.generate(Modality.TEXT, Modality.IMAGE, ids, mask)
    assert images.shape == (3, 1, 32, 96) and images.abs().max() <= 1.0


def test_sampled_image_codes_follow_the_generator():
    model = tiny_model()
    batch = make_batch()
    ids, mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    source, source_mask = model.encode(Modality.TEXT, ids, mask)
    draw = lambda seed: model.head(Modality.IMAGE).generate_codes(  # noqa: E731
        model, source, source_mask, temperature=1.0, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_a_code_token_reads_the_source_token_of_its_column():
    model = tiny_model()
    source = torch.randn(1, 4, 64)
    widths = torch.tensor([[16.0, 32.0, 48.0, 0.0]])  # columns 0-1, 2-5, 6-11 (8 pixels each)
    head = model.head(Modality.IMAGE)
    tokens = head.code_tokens(model, source, widths).reshape(1, 4, 12, 64)
    reads = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    # Column centres 4, 12, ... 92 pixels, in eighths of their token's span.
    phases = [2, 6, 1, 3, 5, 7, 0, 2, 3, 4, 6, 7]
    with torch.no_grad():
        rest = tokens[0] - source[0, reads][None] - head.column_phase_embed.weight[phases][None]  # (4, 12, 64)
        rest = rest - head.row_embed.weight[:, None, :]
    torch.testing.assert_close(rest, rest[0, 0].expand(4, 12, -1))  # what is left: the image type embedding


def test_generated_audio_is_silent_after_the_predicted_durations_and_inverts_the_normalisation():
    model = tiny_model()
    batch = make_batch()
    head = model.head(Modality.AUDIO)
    with torch.no_grad():  # e - 1 frames for every real token
        head.duration_head.weight.zero_()
        head.duration_head.bias.fill_(1.0)
    ids, mask = batch.references[Modality.AUDIO].ids, batch.references[Modality.AUDIO].mask
    mels = model.generate(Modality.TEXT, Modality.AUDIO, ids, mask)
    lengths = (torch.e - 1) * mask.sum(1)  # (B,) predicted frames
    frames_per_token = head.frames_per_token
    tokens = math.ceil(float(lengths.max()) / frames_per_token)
    assert mels.shape == (3, tokens * frames_per_token, 16) and mels.dtype == torch.float32
    assert float(mels.min()) >= SILENCE
    after = torch.arange(mels.shape[1])[None, :] >= lengths[:, None]
    assert bool((mels[after] == SILENCE).all())
    # What the head regresses: real frames, then silence, in normalised units.
    log_mels = torch.randn(2, 5, 16)
    frame_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    target = head.mel_targets(log_mels, frame_mask, 8)
    assert target.shape == (2, 8, 16)
    torch.testing.assert_close(target[0, :5] * MEL_SCALE + MEL_CENTER, log_mels[0])
    torch.testing.assert_close(target[1, :2] * MEL_SCALE + MEL_CENTER, log_mels[1, :2])
    assert torch.allclose(target[1, 2:] * MEL_SCALE + MEL_CENTER, torch.tensor(SILENCE))
    assert torch.allclose(target[0, 5:] * MEL_SCALE + MEL_CENTER, torch.tensor(SILENCE))


def _align_by_loop(durations: list[float], r: int) -> list[tuple[int, int]]:
    """The length regulator the slow way: walk the frames, one token span at a time."""
    out, start = [], 0.0
    spans = []
    for i, d in enumerate(durations):
        spans.append((i, start, start + d))
        start += d
    j = 0
    while (j + 0.5) * r < start:
        centre = (j + 0.5) * r
        i, begin, end = next(span for span in spans if span[1] <= centre < span[2])
        out.append((i, min(int((centre - begin) / (end - begin) * PHASE_BUCKETS), PHASE_BUCKETS - 1)))
        j += 1
    return out


def test_the_length_regulator_matches_a_frame_by_frame_walk():
    g = torch.Generator().manual_seed(3)
    durations = torch.rand(4, 7, generator=g) * 12
    durations[:, 0] = 0.0  # bos
    durations[1, 3] = 0.0  # a silent token inside
    durations[2, 5:] = 0.0  # padding
    for r in (1, 4, 8):
        count = math.ceil(float(durations.sum(1).max()) / r)
        index, phase, inside = align_frames(durations, r, count)
        for b in range(4):
            expected = _align_by_loop(durations[b].tolist(), r)
            got = list(zip(index[b][inside[b]].tolist(), phase[b][inside[b]].tolist()))
            assert got == expected
            # Past the item's end: its last token of nonzero duration, in its last part.
            last = max(i for i, d in enumerate(durations[b].tolist()) if d > 0)
            assert set(index[b][~inside[b]].tolist()) <= {last}
            assert set(phase[b][~inside[b]].tolist()) <= {PHASE_BUCKETS - 1}
        assert 0 not in index.tolist() and 3 not in index[1].tolist()  # zero length: never read


def test_the_duration_loss_trains_the_duration_head_towards_log_frames():
    model = tiny_model().train()
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(batch).losses["text_to_audio_duration"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        speech = batch.references[Modality.AUDIO]
        source, source_mask = model.encode(Modality.TEXT, speech.ids, speech.mask)
        states = model.source_states(source, source_mask)
        predicted = torch.expm1(model.head(Modality.AUDIO).duration_head(states).squeeze(-1))
    real = speech.mask
    assert float((predicted[real] - speech.durations[real]).abs().mean()) < 1.0


def test_contrastive_embeddings_from_task_passes_equal_a_pass_over_the_source_alone():
    """Sources never attend targets, so the pooled source states of image->text equal embed()'s."""
    embeddings = assert_task_pass_embeddings_equal_embed(tiny_model(), make_batch())
    for alone in embeddings.values():
        torch.testing.assert_close(alone.norm(dim=-1), torch.ones(3))


def test_the_image_tokenizer_is_frozen_and_stays_in_eval_mode():
    model = tiny_model().train()
    assert not model.image_tokenizer.training
    before = {k: v.clone() for k, v in model.image_tokenizer.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = sum(model(make_batch()).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.image_tokenizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, EMA codebook and counts
    assert not any(p.requires_grad for p in model.image_tokenizer.parameters())


def test_a_task_fraction_trains_that_task_on_the_first_items_only():
    model = tiny_model()
    model.tasks["text_to_audio"].fraction = 0.5  # ceil(0.5 * 3) = the first 2 items
    batch = make_batch()
    head = Batch(
        {m: x[:2] for m, x in batch.inputs.items()},
        {m: x[:2] for m, x in batch.masks.items()},
        {m: x[:2] for m, x in batch.present.items()},
        batch.labels[:2],
        {m: x.select(torch.tensor([True, True, False])) for m, x in batch.references.items()},
    )
    with torch.no_grad():
        part = model(batch).losses
        model.tasks["text_to_audio"].fraction = 1.0
        whole, first_two = model(batch).losses, model(head).losses
    torch.testing.assert_close(part["text_to_audio"], first_two["text_to_audio"])
    torch.testing.assert_close(part["image_to_text"], whole["image_to_text"])  # other tasks see every item
