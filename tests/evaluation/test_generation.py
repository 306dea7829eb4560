"""Judging generated samples: voiced-frame lengths by hand, cached judges equal freshly trained
ones, and the figures of a hand-made "model" whose outputs are real test items."""

from __future__ import annotations

import pytest
import torch

from polymodal.config import DataConfig
from polymodal.data.collate import build_collator
from polymodal.data.sources import build_data
from polymodal.data.text import TextTokenizer
from polymodal.evaluation import generation
from polymodal.modality import Modality


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYMODAL_CACHE", str(cache))
        config = DataConfig(num_samples=300)
        data = build_data(config, seed=0)
        collator = build_collator(TextTokenizer.train(data.train_texts, vocab_size=300), config)
        yield config, data, collator, cache


def test_voiced_frames_counts_up_to_the_last_voiced_frame():
    quiet, loud = generation.VOICED_LEVEL - 5, generation.VOICED_LEVEL + 5
    mels = torch.full((3, 6, 4), quiet)
    mels[0, 1, 2] = loud  # voiced at frame 1 only
    mels[1, [0, 4], 0] = loud  # a gap does not end the clip: frames 0..4
    assert generation.voiced_frames(mels).tolist() == [2, 5, 1]  # all quiet: one frame


def test_cached_judges_equal_the_freshly_trained_ones(small, monkeypatch):
    config, data, collator, cache = small
    monkeypatch.setenv("POLYMODAL_CACHE", str(cache))
    fresh = generation.load_judges(config, 0, data.train, data.test, collator)
    assert list(cache.glob("judges-*.safetensors"))
    cached = generation.load_judges(config, 0, data.train, data.test, collator)
    assert (cached.image_accuracy, cached.audio_accuracy) == (fresh.image_accuracy, fresh.audio_accuracy)
    for a, b in ((fresh.image, cached.image), (fresh.audio, cached.audio)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name


class _Replay(torch.nn.Module):
    """A stand-in generator that 'generates' each caption's own real image or log-mel, so the
    judged figures must equal the judge's accuracy on those real items."""

    def __init__(self, batches):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.batches = iter(batches)

    def generate_image(self, ids, mask):
        return next(self.batches).inputs[Modality.IMAGE]

    def generate_audio(self, ids, mask):
        batch = next(self.batches)
        mels = batch.inputs[Modality.AUDIO].masked_fill(~batch.masks[Modality.AUDIO][:, :, None], -23.0)
        return mels


def test_images_that_are_the_real_ones_score_as_the_judge_reads_real_images(small, monkeypatch):
    from torch.utils.data import DataLoader

    from polymodal.evaluation.probes import predict_numbers

    config, data, collator, cache = small
    monkeypatch.setenv("POLYMODAL_CACHE", str(cache))
    judges = generation.load_judges(config, 0, data.train, data.test, collator)
    batches = list(DataLoader(data.test, batch_size=16, collate_fn=collator))
    figures, made = generation.text_to_image_figures(
        _Replay(batches), data.test, collator, judges.image, collator.tokenizer.decode, batch_size=16
    )
    real = torch.cat([predict_numbers(judges.image, b.inputs[Modality.IMAGE]) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert figures["count"] == len(data.test) == len(made.captions)
    assert figures["probe_correct"] == pytest.approx(float((real == labels).float().mean()))
    assert torch.equal(made.labels, labels)
