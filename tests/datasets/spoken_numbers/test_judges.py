"""Judging generated samples of the built-in data: voiced-frame lengths by hand, cached judges equal
freshly trained ones, and the figures of a stand-in "model" whose outputs are real test items."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from polymodal.config import DataConfig
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets.spoken_numbers import judges
from polymodal.datasets.spoken_numbers.probe_training import predict_numbers
from polymodal.datasets.spoken_numbers.references import reference_speech
from polymodal.datasets.spoken_numbers.source import SpokenNumbersSource
from polymodal.evaluation import samples
from polymodal.modality import Modality


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYMODAL_CACHE", str(cache))
        config = DataConfig()
        source = SpokenNumbersSource(config, 0, num_samples=300)
        splits = source.load()
        tokenizer = TextTokenizer.train(splits.train_texts, vocab_size=300)
        collator = build_collator(tokenizer, config, front_end=source.source_text)
        yield config, source, splits, collator, cache


def test_voiced_frames_counts_up_to_the_last_voiced_frame():
    quiet, loud = samples.VOICED_LEVEL - 5, samples.VOICED_LEVEL + 5
    mels = torch.full((3, 6, 4), quiet)
    mels[0, 1, 2] = loud  # voiced at frame 1 only
    mels[1, [0, 4], 0] = loud  # a gap does not end the clip: frames 0..4
    assert samples.voiced_frames(mels).tolist() == [2, 5, 1]  # all quiet: one frame


def test_cached_judges_equal_the_freshly_trained_ones(small, monkeypatch):
    config, _, splits, collator, cache = small
    monkeypatch.setenv("POLYMODAL_CACHE", str(cache))
    fresh = judges.load_judges(config, 0, splits.train, splits.test, collator, max_digits=3, recorded_share=0.0)
    assert list(cache.glob("judges-*.safetensors"))
    cached = judges.load_judges(config, 0, splits.train, splits.test, collator, max_digits=3, recorded_share=0.0)
    assert (cached.image_accuracy, cached.audio_accuracy) == (fresh.image_accuracy, fresh.audio_accuracy)
    for a, b in ((fresh.image, cached.image), (fresh.audio, cached.audio)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name


class _Replay(torch.nn.Module):
    """A stand-in generator that 'generates' each caption's own real image or log-mel, so the
    judged figures must equal the judge's reading of those real items."""

    generation_tasks: dict = {}
    image_tokenizer = None

    def __init__(self, batches):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.batches = iter(batches)

    def head(self, target):
        return self  # its generate takes no sampling option

    def generate(self, source, target, ids, mask):
        batch = next(self.batches)
        if target is Modality.IMAGE:
            return batch.inputs[Modality.IMAGE]
        return batch.inputs[Modality.AUDIO].masked_fill(~batch.masks[Modality.AUDIO][:, :, None], -23.0)


@dataclasses.dataclass
class _Run:
    model: torch.nn.Module
    collator: object
    config: object
    splits: object


def _replayed(small, monkeypatch, target: Modality):
    """The test split's own items 'generated' for every caption, their judged figures, the judges
    and the replayed batches."""
    config, source, splits, collator, cache = small
    monkeypatch.setenv("POLYMODAL_CACHE", str(cache))
    batches = list(DataLoader(splits.test, batch_size=samples.GENERATION_BATCH, collate_fn=collator))
    run = _Run(_Replay(batches), collator, dataclasses.make_dataclass("C", [("data", object)])(config), splits)
    made = samples.generate_from_captions(run, splits.test, target)
    task = f"text_to_{target}"
    figures = source.evaluate_generation(run, splits.test, {task: made})[task]
    found = judges.load_judges(config, 0, splits.train, splits.test, collator, max_digits=3, recorded_share=0.0)
    return made, figures, found, batches


def test_generated_images_that_are_the_real_ones_score_as_the_judge_reads_real_images(small, monkeypatch):
    splits = small[2]
    made, figures, found, batches = _replayed(small, monkeypatch, Modality.IMAGE)
    real = torch.cat([predict_numbers(found.image, b.inputs[Modality.IMAGE]) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert figures["count"] == len(splits.test) == len(made.captions)
    assert figures["probe_correct"] == pytest.approx(float((real == labels).float().mean()))
    assert figures["judge_accuracy_on_real_test"] == found.image_accuracy
    assert torch.equal(made.labels, labels)


def test_speech_figures_carry_the_judges_reading_of_the_reference_voice(small, monkeypatch):
    config, collator = small[0], small[3]
    made, figures, found, _ = _replayed(small, monkeypatch, Modality.AUDIO)
    # By hand: each asked number once, in the reference voice, through the vocoder as generated speech goes.
    asked = sorted(set(made.labels.tolist()))
    references = reference_speech(asked, sample_rate=config.sample_rate)
    assert len(asked) <= judges.ROUND_TRIP_BATCH  # one batch, so its padding and phases are the function's
    waves = [torch.from_numpy(references[n].value) for n in asked]
    audio = torch.zeros(len(waves), max(len(w) for w in waves))
    for row, wave in zip(audio, waves):
        row[: len(wave)] = wave
    view, vocoder = collator.log_mel_view(), samples.vocoder_for(config)
    mels = view.log_mel(audio)
    heard = view.log_mel(vocoder(mels, generator=torch.Generator().manual_seed(0)))[:, : mels.shape[1]]
    mask = torch.arange(mels.shape[1])[None, :] < samples.voiced_frames(mels)[:, None]
    read = predict_numbers(found.audio, heard, mask).cpu()
    assert figures["judge_accuracy_on_reference_voice"] == pytest.approx(float((read == torch.tensor(asked)).float().mean()))
    # The judge is handed what a listener hears, and each distinct number counts once: a judge that
    # reads every clip as the first number scores 1 / numbers.
    given = []

    def constant(judge, clips, clip_mask):
        given.append((clips, clip_mask))
        return torch.full((len(clips),), asked[0])

    monkeypatch.setattr(judges, "predict_numbers", constant)
    assert judges.reference_voice_accuracy(found.audio, references, view, vocoder) == pytest.approx(1 / len(asked))
    assert torch.allclose(given[0][0], heard) and torch.equal(given[0][1], mask)
