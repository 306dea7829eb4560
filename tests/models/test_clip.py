"""The CLIP model: its loss against a hand-written dense symmetric cross-entropy, tiled against
dense (forward and gradients), unit-norm embeddings, padding invariance, partial batches, the
clamped shared temperature, and config checking."""

from __future__ import annotations

import pytest
import torch

from polymodal.config import load_config
from polymodal.data.batch import Batch
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.shapes import TextSpecials
from polymodal.models.shapes import DataShapes
from polymodal.models.architectures import build_model, check_model
from polymodal.models.clip import ClipModel
from polymodal.tasks import TASKS

VOCAB = 40
SHAPES = DataShapes(image_size=(32, 96), num_mels=16, text=TextSpecials(vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2))
ALL = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)


def tiny_config(*overrides: str):
    return load_config(
        ["clip"],
        ["model.dim=32", "model.backbone.num_layers=1", "model.backbone.num_heads=2", "model.encoders.audio.num_convs=2", *overrides],
    )


def tiny_model(*overrides: str, seed: int = 0) -> ClipModel:
    torch.manual_seed(seed)
    return build_model(tiny_config(*overrides), SHAPES)


def make_batch(batch_size: int = 5, text_len: int = 7, frames: int = 32, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, text_len), generator=g)
    text_mask = torch.ones(batch_size, text_len, dtype=torch.bool)
    text_mask[0, 4:] = False
    ids[0, 4:] = 0
    audio_mask = torch.ones(batch_size, frames, dtype=torch.bool)
    audio_mask[1, 16:] = False
    return Batch(
        inputs={
            Modality.IMAGE: torch.randn(batch_size, 1, 32, 96, generator=g),
            Modality.TEXT: ids,
            Modality.AUDIO: torch.randn(batch_size, frames, 16, generator=g).masked_fill(~audio_mask[:, :, None], 0.0),
        },
        masks={Modality.TEXT: text_mask, Modality.AUDIO: audio_mask},
        present={m: torch.ones(batch_size, dtype=torch.bool) for m in ALL},
        labels=torch.arange(batch_size),
    )


def dense_symmetric_ce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's pseudo-code, written out: mean of row-wise and column-wise -log softmax of the diagonal."""
    logits = scale * a @ b.T  # (n, n)
    rows = -torch.log_softmax(logits, dim=1).diagonal().mean()
    cols = -torch.log_softmax(logits, dim=0).diagonal().mean()
    return (rows + cols) / 2


def test_loss_per_pair_equals_hand_written_dense_cross_entropy():
    model = tiny_model()
    batch = make_batch()
    out = model(batch)
    assert set(out.losses) == {"clip_image_text", "clip_audio_text", "clip_image_audio"}
    with torch.no_grad():
        emb = {m: model.embed(m, batch.inputs[m], batch.masks.get(m)) for m in ALL}
        scale = model.contrastive.logit_scale()
    for name, (a, b) in {
        "clip_image_text": (Modality.IMAGE, Modality.TEXT),
        "clip_audio_text": (Modality.AUDIO, Modality.TEXT),
        "clip_image_audio": (Modality.IMAGE, Modality.AUDIO),
    }.items():
        torch.testing.assert_close(out.losses[name].detach(), dense_symmetric_ce(emb[a], emb[b], scale), rtol=1e-5, atol=1e-6)
    assert out.metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert all(0.0 <= out.metrics[f"{name}_acc"] <= 1.0 for name in out.losses)


def test_partial_batch_pairs_only_items_that_have_both():
    model = tiny_model()
    batch = make_batch()
    batch.present[Modality.AUDIO] = torch.tensor([True, False, True, True, False])
    batch.present[Modality.TEXT] = torch.tensor([True, True, False, True, True])
    out = model(batch)
    with torch.no_grad():
        emb = {m: model.embed(m, batch.inputs[m], batch.masks.get(m)) for m in ALL}
        scale = model.contrastive.logit_scale()
    for name, (a, b) in {
        "clip_image_text": (Modality.IMAGE, Modality.TEXT),
        "clip_audio_text": (Modality.AUDIO, Modality.TEXT),
        "clip_image_audio": (Modality.IMAGE, Modality.AUDIO),
    }.items():
        both = batch.present[a] & batch.present[b]
        expected = dense_symmetric_ce(emb[a][both], emb[b][both], scale)
        torch.testing.assert_close(out.losses[name].detach(), expected, rtol=1e-5, atol=1e-6)


def test_unique_labels_drops_false_negatives_among_items_with_both():
    model = tiny_model("model.contrastive.unique_labels=true")
    batch = make_batch(batch_size=6)
    batch.labels = torch.tensor([7, 3, 7, -1, 3, -1])
    batch.present[Modality.AUDIO] = torch.tensor([False, True, True, True, True, True])
    out = model(batch)
    with torch.no_grad():
        emb = {m: model.embed(m, batch.inputs[m], batch.masks.get(m)) for m in ALL}
        scale = model.contrastive.logit_scale()
    kept = {
        "clip_image_text": [0, 1, 3, 5],  # the second 7 and the second 3 go; unlabelled items stay
        "clip_audio_text": [1, 2, 3, 5],  # item 0 has no audio, so the 7 kept is item 2
        "clip_image_audio": [1, 2, 3, 5],
    }
    pairs = {"clip_image_text": (Modality.IMAGE, Modality.TEXT), "clip_audio_text": (Modality.AUDIO, Modality.TEXT)}
    pairs["clip_image_audio"] = (Modality.IMAGE, Modality.AUDIO)
    for name, rows in kept.items():
        a, b = pairs[name]
        expected = dense_symmetric_ce(emb[a][rows], emb[b][rows], scale)
        torch.testing.assert_close(out.losses[name].detach(), expected, rtol=1e-5, atol=1e-6)


def test_tiled_loss_and_gradients_equal_dense():
    batch = make_batch(batch_size=6)
    dense, tiled = tiny_model(), tiny_model("model.contrastive.tile_size=4")
    tiled.load_state_dict(dense.state_dict())
    grads = []
    for model in (dense, tiled):
        model.zero_grad()
        out = model(batch)
        sum(out.losses.values()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        grads[-1]["loss"] = torch.stack(list(out.losses.values())).detach()
    assert grads[0].keys() == grads[1].keys() and "contrastive.logit_scale.log_scale" in grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6)


def test_embeddings_are_unit_norm_float32():
    model = tiny_model("model.contrastive.embed_dim=24").eval()
    batch = make_batch()
    for modality in ALL:
        emb = model.embed(modality, batch.inputs[modality], batch.masks.get(modality))
        assert emb.shape == (batch.size, 24) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(batch.size))


def test_padding_an_item_does_not_change_its_embedding():
    model = tiny_model().eval()
    batch = make_batch()
    with torch.no_grad():
        # Text item 0 has 4 real tokens and 3 pads; alone and unpadded it must embed the same.
        ids, mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
        padded = model.embed(Modality.TEXT, ids, mask)[0]
        alone = model.embed(Modality.TEXT, ids[:1, :4], mask[:1, :4])[0]
        more = model.embed(Modality.TEXT, torch.cat([ids[:1], torch.zeros(1, 9, dtype=torch.long)], 1), torch.cat([mask[:1], torch.zeros(1, 9, dtype=torch.bool)], 1))[0]
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(more, alone, rtol=1e-5, atol=1e-6)
        # Audio item 1 has 16 real frames of 32 (a multiple of the 4x subsampling: no edge effects).
        audio, audio_mask = batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]
        padded = model.embed(Modality.AUDIO, audio, audio_mask)[1]
        alone = model.embed(Modality.AUDIO, audio[1:2, :16], audio_mask[1:2, :16])[0]
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
        # And the embedding differs between items (the mask does not erase the content).
        assert not torch.allclose(model.embed(Modality.TEXT, ids, mask)[1], model.embed(Modality.TEXT, ids, mask)[2])


def test_logit_scale_is_shared_learned_and_clamped():
    model = tiny_model("model.contrastive.init_scale=20.0", "model.contrastive.max_scale=20.0")
    out = model(make_batch())
    assert out.metrics["logit_scale"] == pytest.approx(20.0)
    names = [n for n, _ in model.named_parameters() if "log_scale" in n]
    assert names == ["contrastive.logit_scale.log_scale"]  # one temperature for every pair


def test_pairs_setting_and_two_modalities():
    model = tiny_model("model.contrastive.pairs=[image_text]")
    assert set(model(make_batch()).losses) == {"clip_image_text"}
    config = tiny_config()
    del config.model.encoders["audio"]
    model = build_model(config, SHAPES)
    assert model.modalities == [Modality.IMAGE, Modality.TEXT]
    assert set(model(make_batch()).losses) == {"clip_image_text"}


def test_training_steps_lower_the_loss():
    model = tiny_model()
    batch = make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = sum(model(batch).losses.values()).item()
    for _ in range(15):
        optimizer.zero_grad()
        sum(model(batch).losses.values()).backward()
        optimizer.step()
    assert sum(model(batch).losses.values()).item() < 0.5 * first


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.contrastive.temperature=0.1", "model.contrastive.temperature: unknown setting of task 'contrastive'; valid: embed_dim, init_scale"),
        ("model.contrastive.pairs=[image_video]", "model.contrastive: unknown modality pair 'image_video'; valid: image_text, audio_text, image_audio"),
        ("model.contrastive.init_scale=200", "model.contrastive: need 0 < init_scale (200) <= max_scale (100.0)"),
        ("model.contrastive.tile_size=0", "model.contrastive: tile_size must be a positive integer"),
        ("model.encoders.text.name=cnn", "'cnn' encodes image, not text; valid: "),
    ],
)
def test_bad_contrastive_settings_name_the_key_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        tiny_config(override)
    assert message in str(info.value)


def test_settings_are_the_keyword_only_constructor_arguments():
    settings = ["embed_dim", "init_scale", "max_scale", "tiled_above", "tile_size", "pairs", "unique_labels"]
    assert list(TASKS.settings("contrastive")) == settings
    config = tiny_config()
    config.model.encoders = {"image": config.model.encoders["image"]}
    with pytest.raises(ConfigError, match="model.contrastive: contrastive alignment needs encoders of two modalities"):
        check_model(config)


def test_builds_on_meta_and_round_trips_state_dict():
    with torch.device("meta"):
        meta = build_model(tiny_config(), SHAPES)
    assert all(p.device.type == "meta" for p in meta.parameters())
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    other.load_state_dict(model.state_dict())
    batch = make_batch()
    torch.testing.assert_close(other(batch).losses["clip_image_text"], model(batch).losses["clip_image_text"])
