"""The LM head's label smoothing against a dense reference written here, beam search against the
exhaustive search and against greedy decoding, and its settings' checks."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from polymodal.config import load_config
from polymodal.heads import HEADS, HeadWiring
from polymodal.heads.text import IGNORE_INDEX, token_loss
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.models.shapes import TextSpecials

from batches import SHAPES


def _smoothed_reference(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Szegedy et al.'s target: 1 - eps on the label plus eps / V on every token, cross-entropy with
    log-softmax, averaged over the counted positions."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, L, V)
    counted = labels != IGNORE_INDEX
    vocab = logits.shape[-1]
    target = torch.full_like(logp, eps / vocab)
    target.scatter_add_(-1, labels.clamp(min=0)[..., None], torch.full_like(logp[..., :1], 1.0 - eps))
    per_position = -(target * logp).sum(-1)  # (B, L)
    return per_position[counted].mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_the_dense_reference(eps):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = IGNORE_INDEX
    loss, metrics = token_loss(logits, labels, label_smoothing=eps)
    assert loss.item() == pytest.approx(_smoothed_reference(logits, labels, eps).item(), rel=1e-6)
    assert 0.0 <= metrics["token_acc"] <= 1.0


def test_head_settings_are_checked():
    head = HEADS.build({"name": "lm", "label_smoothing": 0.1, "dropout": 0.2}, HeadWiring(16, SHAPES))
    assert head.label_smoothing == 0.1 and head.dropout.p == 0.2
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        HEADS.build({"name": "lm", "label_smoothing": 1.0}, HeadWiring(16, SHAPES))


def _vocab_model(vocab: int):
    """The tiny preset's any-to-any model over a text vocabulary of ``vocab`` tokens (3 specials)."""
    torch.manual_seed(0)
    shapes = dataclasses.replace(SHAPES, text=TextSpecials(vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2))
    return build_model(load_config(["tiny"]), shapes).eval()


def _source(model, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(2, 30, SHAPES.num_mels, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 18:] = False
    return model.encode(Modality.AUDIO, audio, mask)


def _text_log_prob(model, source, source_mask, row: int, text: list[int], ended: bool) -> float:
    """Summed log-probability of ``text`` (and ``[eos]`` after it when ``ended``) after item ``row``'s
    source, by one teacher-forced pass."""
    head = model.head(Modality.TEXT)
    targets = [head.specials.bos_id, *text] + ([head.specials.eos_id] if ended else [])
    ids = torch.tensor([targets])
    logits = head.logits(model, source[row : row + 1], source_mask[row : row + 1], ids[:, :-1], torch.ones(1, len(targets) - 1, dtype=torch.bool))
    logp = logits.double().log_softmax(-1)[0]
    return float(logp.gather(-1, ids[0, 1:, None]).sum())


@torch.no_grad()
def test_beam_search_with_a_beam_per_text_is_the_exhaustive_search():
    """Over 6 tokens and up to 3 generated ones, 6^3 beams keep every text: the search must return
    the text of highest log-probability among all of them, scored by teacher forcing."""
    vocab, length = 6, 3
    model = _vocab_model(vocab)
    head = model.head(Modality.TEXT)
    source, source_mask = _source(model)
    found = head.beam_search(model, source, source_mask, num_beams=vocab**length, max_new_tokens=length)
    for row in range(2):
        texts = {}
        for tokens in itertools.product(range(vocab), repeat=length):
            cut = tokens.index(2) if 2 in tokens else length  # the text ends at its first [eos]
            texts[tokens[:cut]] = cut < length
        scored = {text: _text_log_prob(model, source, source_mask, row, list(text), ended) for text, ended in texts.items()}
        best = max(scored, key=scored.get)
        assert found[row] == list(best)
        assert scored[best] > sorted(scored.values())[-2] + 1e-9  # no tie decided by luck


@torch.no_grad()
def test_one_beam_is_greedy_and_the_cache_changes_nothing():
    model = _vocab_model(40)
    head = model.head(Modality.TEXT)
    source, source_mask = _source(model, seed=5)
    greedy = head.generate(model, source, source_mask, max_new_tokens=8)
    assert head.beam_search(model, source, source_mask, num_beams=1, max_new_tokens=8) == greedy
    cached = head.generate(model, source, source_mask, max_new_tokens=8, num_beams=4)
    assert cached == head.generate(model, source, source_mask, max_new_tokens=8, num_beams=4, use_cache=False)


def test_num_beams_is_checked():
    with pytest.raises(ValueError, match="num_beams"):
        HEADS.build({"name": "lm", "num_beams": 0}, HeadWiring(16, SHAPES))
    assert HEADS.build({"name": "lm", "num_beams": 3}, HeadWiring(16, SHAPES)).num_beams == 3
