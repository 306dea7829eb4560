"""The frozen-encoder feature cache: cached features equal the encoder's own output (images without
a mask; speech clips of different lengths with one), in memory and on disk across instances, the
encoder runs only on unseen items, keys separate layers and datasets, and trainable encoders are
refused."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub during the tests

import pytest
import torch

transformers = pytest.importorskip("transformers")

from polymodal.encoders.feature_cache import FeatureCache  # noqa: E402
from polymodal.encoders.hf_audio import HFAudioEncoder  # noqa: E402
from polymodal.encoders.hf_image import HFImageEncoder  # noqa: E402

IMAGE = (16, 24)


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vit")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    image_size=16, patch_size=4)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def wav2vec2(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wav2vec2")
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    )
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(folder)
    return str(folder)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, *IMAGE, generator=torch.Generator().manual_seed(0)) * 2 - 1


class _Counter:
    """Counts the items the wrapped encoder's model is run on."""

    def __init__(self, encoder):
        self.items = 0
        encoder.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.items += next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0]


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_images_equal_the_encoder_and_skip_it(vit, tmp_path, on_disk):
    encoder = HFImageEncoder(1, IMAGE, path=vit).eval()
    counter = _Counter(encoder)
    cache = FeatureCache(encoder, dataset="numbers/train", folder=tmp_path if on_disk else None)
    images = _images(5)
    with torch.no_grad():
        expected = encoder(images).tokens
    counter.items = 0
    first = cache([0, 1, 2], images[:3])
    assert counter.items == 3 and first.mask is None
    # A batch of 3 against one of 5: the last bit may differ (matmul blocking follows the batch on some CPUs).
    torch.testing.assert_close(first.tokens, expected[:3], atol=1e-6, rtol=0)
    mixed = cache([2, 4, 0], images[[2, 4, 0]])  # one unseen item among two cached
    assert counter.items == 4 and (cache.hits, cache.misses) == (2, 4)
    torch.testing.assert_close(mixed.tokens, expected[[2, 4, 0]], atol=1e-6, rtol=0)
    again = cache([0, 1, 2, 4], images[[0, 1, 2, 4]])
    assert counter.items == 4  # the encoder did not run
    torch.testing.assert_close(again.tokens, expected[[0, 1, 2, 4]], atol=1e-6, rtol=0)


def test_disk_entries_are_reused_by_a_new_cache_and_keyed_by_layer_and_dataset(vit, tmp_path):
    images = _images(3)
    first = FeatureCache(HFImageEncoder(1, IMAGE, path=vit), dataset="d", folder=tmp_path)
    expected = first([0, 1, 2], images).tokens
    reborn = FeatureCache(HFImageEncoder(1, IMAGE, path=vit), dataset="d", folder=tmp_path)
    torch.testing.assert_close(reborn([0, 1, 2], images).tokens, expected, atol=0, rtol=0)
    assert (reborn.hits, reborn.misses) == (3, 0)
    other_layer = FeatureCache(HFImageEncoder(1, IMAGE, path=vit, layer=1), dataset="d", folder=tmp_path)
    other_data = FeatureCache(HFImageEncoder(1, IMAGE, path=vit), dataset="e", folder=tmp_path)
    for cache in (other_layer, other_data):
        cache([0], images[:1])
        assert cache.misses == 1 and cache.folder != first.folder
    assert not list(tmp_path.rglob("*.partial"))  # every write completed


def test_cached_speech_features_keep_their_masks(wav2vec2):
    encoder = HFAudioEncoder(16, path=wav2vec2).eval()
    g = torch.Generator().manual_seed(1)
    lengths = (3000, 1800, 2400, 900)
    waveforms = 0.1 * torch.randn(4, 3000, generator=g)
    mask = torch.arange(3000)[None] < torch.tensor(lengths)[:, None]
    waveforms = waveforms * mask
    with torch.no_grad():
        expected = encoder(waveforms, mask)
    cache = FeatureCache(encoder, dataset="speech")
    cache([1, 3], waveforms[[1, 3]], mask[[1, 3]])
    out = cache([0, 1, 2, 3], waveforms, mask)  # two cached, two computed
    assert torch.equal(out.mask, expected.mask[:, : out.mask.shape[1]])
    for b in range(4):
        real = int(expected.mask[b].sum())
        torch.testing.assert_close(out.tokens[b, :real], expected.tokens[b, :real], atol=1e-6, rtol=0)
        assert not out.tokens[b, real:].any()


def test_storage_dtype_and_refusals(vit):
    images = _images(2)
    encoder = HFImageEncoder(1, IMAGE, path=vit)
    half = FeatureCache(encoder, dataset="d", dtype=torch.bfloat16)([0, 1], images)
    with torch.no_grad():
        expected = encoder(images).tokens
    assert half.tokens.dtype == torch.bfloat16
    torch.testing.assert_close(half.tokens.float(), expected, atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="fully frozen encoder"):
        FeatureCache(HFImageEncoder(1, IMAGE, path=vit, freeze="last_n"), dataset="d")
    with pytest.raises(ValueError, match="no cache_identity"):
        FeatureCache(torch.nn.Identity(), dataset="d")
