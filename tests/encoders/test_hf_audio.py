"""The Hugging Face speech encoder on tiny random wav2vec 2.0 (group-norm base and layer-norm
large layouts), HuBERT and Whisper models saved to a temporary folder: tokens equal transformers'
feature extractor + model run on each clip alone, at the chosen layer; our torch features equal the
feature extractors' numpy output; token masks follow the model's frame rate; a clip's tokens do not
depend on its batch; freezing policies; the errors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub during the tests

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from polymodal.encoders import ENCODERS  # noqa: E402
from polymodal.encoders.hf_audio import HFAudioEncoder, conv_output_lengths  # noqa: E402
from polymodal.errors import ConfigError  # noqa: E402

RATE = 16000
NUM_MELS = 16  # the library's, passed as wiring and ignored
LAYERS = 3
CTC = dict(
    hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
    conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    layerdrop=0.0, vocab_size=10,
)
# A 1 s Whisper window: 100 mel frames of 10 ms, 50 encoder positions.
WHISPER = dict(
    d_model=16, encoder_layers=LAYERS, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=50, max_target_positions=16,
    vocab_size=60, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
)
LENGTHS = (4000, 2500, 3333)  # samples of the test clips; the batch is padded to the first


def _families():
    t = transformers
    return {
        "wav2vec2": (t.Wav2Vec2Model(t.Wav2Vec2Config(**CTC)), t.Wav2Vec2FeatureExtractor()),
        "wav2vec2_large": (  # layer-norm feature encoder, norm after the blocks, attention mask
            t.Wav2Vec2Model(t.Wav2Vec2Config(**CTC, do_stable_layer_norm=True, feat_extract_norm="layer")),
            t.Wav2Vec2FeatureExtractor(return_attention_mask=True),
        ),
        "hubert": (t.HubertModel(t.HubertConfig(**CTC)), t.Wav2Vec2FeatureExtractor()),
        "whisper": (
            t.WhisperModel(t.WhisperConfig(**WHISPER)),
            t.WhisperFeatureExtractor(feature_size=8, chunk_length=1),
        ),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    out = {}
    for name, (model, extractor) in _families().items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        extractor.save_pretrained(folder)
        out[name] = str(folder)
    return out


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    waveforms = torch.zeros(len(LENGTHS), max(LENGTHS))
    mask = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        t = torch.arange(n) / RATE
        waveforms[b, :n] = 0.3 * torch.sin(2 * torch.pi * (200 + 150 * b) * t) + 0.05 * torch.randn(n, generator=g)
        mask[b, :n] = True
    return waveforms, mask


def _theirs(folder: str, clip: np.ndarray, layer: int) -> torch.Tensor:
    """transformers' feature extractor and model on one unpadded clip: (N, D) at ``layer``."""
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    features = extractor(clip, sampling_rate=RATE, return_tensors="pt")
    if isinstance(model, transformers.WhisperModel):
        out = model.get_encoder()(input_features=features["input_features"], output_hidden_states=True)
    else:
        out = model(input_values=features["input_values"], output_hidden_states=True)
    return (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[0]


@pytest.mark.parametrize("layer", [-1, 2])
@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2_large", "hubert", "whisper"])
def test_tokens_equal_transformers_on_each_clip(folders, family, layer):
    encoder = ENCODERS.build({"name": "hf_audio", "path": folders[family], "layer": layer}, NUM_MELS).eval()
    waveforms, mask = _batch()
    with torch.no_grad():
        out = encoder(waveforms, mask)
        inter = encoder.forward_intermediates(waveforms, mask)
    assert out.tokens.shape[-1] == encoder.dim_out == 16 and out.mask.dtype == torch.bool
    assert len(inter.hidden) == (LAYERS if layer == -1 else layer)
    torch.testing.assert_close(inter.output.tokens, out.tokens, atol=1e-6, rtol=0)
    for b, n in enumerate(LENGTHS):
        with torch.no_grad():
            expected = _theirs(folders[family], waveforms[b, :n].numpy(), layer)
        real = int(out.mask[b].sum())
        if family != "whisper":  # Whisper's encoder runs on its whole (padded) window: compare the real part
            assert real == expected.shape[0]
        torch.testing.assert_close(out.tokens[b, :real], expected[:real], atol=2e-5, rtol=1e-4)
        assert not out.mask[b, real:].any()


def test_token_masks_follow_the_models_frame_rate(folders):
    wav2vec2 = transformers.AutoModel.from_pretrained(folders["wav2vec2"], local_files_only=True)
    samples = torch.tensor([400, 409, 410, 4000, 16000, 0])
    ours = conv_output_lengths(samples, CTC["conv_kernel"], CTC["conv_stride"])
    assert torch.equal(ours[:-1], wav2vec2._get_feat_extract_output_lengths(samples[:-1]))
    assert ours[-1] == 0

    whisper = HFAudioEncoder(NUM_MELS, path=folders["whisper"])
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folders["whisper"], local_files_only=True)
    for n in (1, 159, 160, 161, 2500, 16000):
        mel_mask = extractor(np.zeros(n), sampling_rate=RATE, return_attention_mask=True)["attention_mask"]
        mel_frames = torch.tensor([int(np.sum(mel_mask))])
        expected = whisper.model._get_feat_extract_output_lengths(mel_frames)
        assert torch.equal(whisper.output_lengths(torch.tensor([n])), expected), n


def test_features_equal_the_feature_extractors(folders):
    waveforms, mask = _batch()
    wav2vec2 = HFAudioEncoder(NUM_MELS, path=folders["wav2vec2"])
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folders["wav2vec2"], local_files_only=True)
    ours = wav2vec2.normalize_waveforms(waveforms, mask)
    for b, n in enumerate(LENGTHS):
        theirs = extractor(waveforms[b, :n].numpy(), sampling_rate=RATE, return_tensors="np")["input_values"][0]
        np.testing.assert_allclose(ours[b, :n].numpy(), theirs, atol=1e-5)
        assert not ours[b, n:].any()

    whisper = HFAudioEncoder(NUM_MELS, path=folders["whisper"])
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folders["whisper"], local_files_only=True)
    clips = [waveforms[b, :n].numpy() for b, n in enumerate(LENGTHS)]
    theirs = extractor(clips, sampling_rate=RATE, return_tensors="np")["input_features"]  # numpy path
    ours = whisper.whisper_log_mel(waveforms, mask).numpy()
    assert ours.shape == theirs.shape == (3, 8, 100)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2_large", "whisper"])
def test_a_clips_tokens_do_not_depend_on_its_batch(folders, family):
    encoder = HFAudioEncoder(NUM_MELS, path=folders[family]).eval()
    waveforms, mask = _batch()
    with torch.no_grad():
        batch = encoder(waveforms, mask)
        alone = encoder(waveforms[1:2, : LENGTHS[1]], mask[1:2, : LENGTHS[1]])
    real = int(alone.mask.sum())
    assert alone.mask.all() and int(batch.mask[1].sum()) == real
    torch.testing.assert_close(batch.tokens[1, :real], alone.tokens[0], atol=2e-5, rtol=1e-4)


def test_batch_padding_is_the_zero_padded_batch_without_a_mask(folders):
    encoder = HFAudioEncoder(NUM_MELS, path=folders["wav2vec2"], batch_padding=True).eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(folders["wav2vec2"], local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folders["wav2vec2"], local_files_only=True).eval()
    waveforms, mask = _batch()
    values = torch.zeros(waveforms.shape)
    for b, n in enumerate(LENGTHS):  # each clip normalised alone, then zero padded
        values[b, :n] = extractor(waveforms[b, :n].numpy(), sampling_rate=RATE, return_tensors="pt")["input_values"][0]
    with torch.no_grad():
        ours = encoder(waveforms, mask)
        theirs = model(input_values=values).last_hidden_state
    torch.testing.assert_close(ours.tokens, theirs, atol=2e-5, rtol=1e-4)
    assert "batch_padding=True" in encoder.cache_identity()


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2_large", "whisper"])
def test_an_absent_clip_gives_no_real_tokens(folders, family):
    encoder = HFAudioEncoder(NUM_MELS, path=folders[family]).eval()
    waveforms, mask = _batch()
    mask[2] = False  # an item without audio, filled with zeros by the collator
    waveforms[2] = 0.0
    with torch.no_grad():
        out = encoder(waveforms, mask)
    assert torch.isfinite(out.tokens).all() and not out.mask[2].any() and out.mask[0].any()


def test_freezing_policies(folders):
    large = HFAudioEncoder(NUM_MELS, path=folders["wav2vec2_large"], freeze="last_n", last_n=1)
    trainable = {n for n, p in large.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.encoder.layers.2.", "model.encoder.layer_norm.")) for n in trainable)
    assert "model.encoder.layer_norm.weight" in trainable  # after the blocks in the large layout
    base = HFAudioEncoder(NUM_MELS, path=folders["wav2vec2"], freeze="last_n", last_n=1)
    assert all(n.startswith("model.encoder.layers.2.") for n, p in base.named_parameters() if p.requires_grad)
    # Under ``full`` everything trains but Whisper's fixed sinusoidal positions.
    full = HFAudioEncoder(NUM_MELS, path=folders["wav2vec2"], freeze="full")
    assert all(p.requires_grad for p in full.parameters())
    assert "model.masked_spec_embed" not in dict(full.named_parameters())  # Hugging Face's SpecAugment token: off
    whisper = HFAudioEncoder(NUM_MELS, path=folders["whisper"], freeze="full")
    assert {n for n, p in whisper.named_parameters() if not p.requires_grad} == {"model.embed_positions.weight"}
    assert not any(p.requires_grad for p in HFAudioEncoder(NUM_MELS, path=folders["hubert"]).parameters())


def test_errors_name_the_problem(folders, tmp_path):
    assert HFAudioEncoder.input_kind == "waveform"
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio\.path.*nothing is downloaded"):
        HFAudioEncoder(NUM_MELS, path="facebook/wav2vec2-base")
    with pytest.raises(ConfigError, match=r"sample_rate=22050.*set data\.sample_rate=16000"):
        HFAudioEncoder(NUM_MELS, path=folders["hubert"], sample_rate=22050)
    with pytest.raises(ConfigError, match=r"layer=-4.*-1\.\.-3"):
        HFAudioEncoder(NUM_MELS, path=folders["hubert"], layer=-4)
    encoder = HFAudioEncoder(NUM_MELS, path=folders["whisper"])
    with pytest.raises(ValueError, match="reads waveforms"):
        encoder(torch.randn(2, 40, NUM_MELS))
    with pytest.raises(ValueError, match="exceeds Whisper's 16000-sample window"):
        encoder(torch.randn(1, 16001))
    vit = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    transformers.ViTModel(vit).save_pretrained(tmp_path)
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a 'vit' model"):
        HFAudioEncoder(NUM_MELS, path=str(tmp_path))


def test_builds_on_the_meta_device_with_the_same_shapes(folders):
    for family in ("wav2vec2", "whisper"):
        encoder = HFAudioEncoder(NUM_MELS, path=folders[family], layer=2)
        with torch.device("meta"):
            meta = HFAudioEncoder(NUM_MELS, path=folders[family], layer=2)
        assert all(p.is_meta for p in meta.parameters())
        assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in encoder.named_parameters()}
