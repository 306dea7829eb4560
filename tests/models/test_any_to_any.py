"""The any-to-any model: cached vs uncached generation, padding invariance, a learning step."""

from __future__ import annotations

import torch

from polymodal.config import load_config
from polymodal.data.batch import Batch
from polymodal.modality import Modality
from polymodal.models.any_to_any import TextSpecials
from polymodal.models.build import DataShapes, build_model

VOCAB = 40
SPECIALS = TextSpecials(vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2)
SHAPES = DataShapes(image_size=(32, 96), num_mels=16, text=SPECIALS)


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
    return Batch(
        inputs={
            Modality.IMAGE: torch.randn(batch_size, 1, 32, 96, generator=g),
            Modality.TEXT: ids,
            Modality.AUDIO: torch.randn(batch_size, frames, 16, generator=g),
        },
        masks={Modality.TEXT: text_mask, Modality.AUDIO: audio_mask},
        present=present,
        labels=torch.arange(batch_size),
    )


def test_cached_generation_equals_full_recomputation():
    model = tiny_model()
    batch = make_batch()
    for modality in (Modality.IMAGE, Modality.AUDIO):
        mask = batch.masks.get(modality)
        kwargs = dict(max_new_tokens=12, temperature=0.0)
        cached = model.generate_text(modality, batch.inputs[modality], mask, use_cache=True, **kwargs)
        full = model.generate_text(modality, batch.inputs[modality], mask, use_cache=False, **kwargs)
        assert cached == full
        assert all(len(ids) > 0 for ids in cached)


def test_padding_a_batch_does_not_change_an_items_logits():
    model = tiny_model()
    batch = make_batch()
    audio, audio_mask = batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]
    ids, text_mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    with torch.no_grad():
        source, source_mask = model.encode_source(Modality.AUDIO, audio, audio_mask)
        batched = model.text_logits(source, source_mask, ids, text_mask)
        # Item 1 alone, cut to its 20 real frames (no padding at all).
        alone_source, alone_mask = model.encode_source(Modality.AUDIO, audio[1:2, :20], audio_mask[1:2, :20])
        alone = model.text_logits(alone_source, alone_mask, ids[1:2], text_mask[1:2])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_loss_is_named_per_task_and_falls_with_training():
    model = tiny_model().train()
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)
    assert set(first.losses) == {"image_to_text", "audio_to_text"}
    assert 0.0 <= first.metrics["image_to_text_token_acc"] <= 1.0
    for _ in range(30):
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
    assert set(model(batch).losses) == {"image_to_text"}
