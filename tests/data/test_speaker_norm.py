"""data.speaker_norm: each speaker's log-mel statistics over his clips, against utterance_norm of
his clips joined into one; a clip of no speaker normalised on its own; a speaker's gain removed;
the kept (training) frames as the batched ones; the config checks."""

from __future__ import annotations

import pytest
import torch

from polymodal.config import load_config
from polymodal.data.audio import utterance_norm
from polymodal.data.batch import ItemKey, Sample
from polymodal.data.collate import Collator
from polymodal.data.speaker_norm import SpeakerStatistics, speaker_normalised
from polymodal.data.text import TextTokenizer
from polymodal.errors import ConfigError
from polymodal.modality import Modality

SETTINGS = dict(sample_rate=8000, n_fft=256, hop_length=64, num_mels=24, max_text_tokens=8, max_audio_seconds=0.5)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(["one", "two", "three"], vocab_size=270)


def _voice(seed: int, length: int, tilt: float) -> torch.Tensor:
    """Noise through a one-pole filter: ``tilt`` sets the 'speaker's' spectral slope."""
    noise = torch.randn(length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = torch.zeros_like(noise)
    for t in range(length):
        out[t] = noise[t] + tilt * (out[t - 1] if t else 0.0)
    return (0.1 * out / out.abs().max()).float()


def _dataset() -> list[Sample]:
    """Two speakers with different slopes, three clips each of different lengths, and one clip of no speaker."""
    clips = [Sample(audio=_voice(10 + i, 1200 + 300 * i, 0.9), text="one", speaker="ann") for i in range(3)]
    clips += [Sample(audio=_voice(20 + i, 1500 + 200 * i, -0.5), text="two", speaker="bob") for i in range(3)]
    return clips + [Sample(audio=_voice(30, 2000, 0.3), text="three")]


def test_statistics_match_utterance_norm_of_joined_clips() -> None:
    """A speaker normalised by his statistics = utterance_norm of all his frames as one clip."""
    frames = [torch.randn(n, 6, generator=torch.Generator().manual_seed(n)) * 3 + torch.arange(6.0) for n in (7, 11, 5)]
    statistics = SpeakerStatistics()
    for f in frames:
        statistics.add("ann", f)
    joined = torch.cat(frames)[None]  # (1, 23, 6)
    table = statistics.table()
    ours = speaker_normalised(joined, torch.ones(1, 23, dtype=torch.bool), ["ann"], table)
    torch.testing.assert_close(ours, utterance_norm(joined, None), rtol=1e-4, atol=1e-5)


def test_collator_normalises_by_speaker_and_unknown_clips_alone(tokenizer) -> None:
    collator = Collator(tokenizer, **SETTINGS, speaker_norm=True)
    plain = Collator(tokenizer, **SETTINGS)
    data = _dataset()
    collator.fit_speakers([data[:3], data[3:]])
    assert set(collator.speakers) == {"ann", "bob"}
    batch = collator(data)
    raw = plain(data)
    x, mask = batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]
    torch.testing.assert_close(mask, raw.masks[Modality.AUDIO])
    # The clip with no speaker: its own statistics.
    torch.testing.assert_close(x[6:], utterance_norm(raw.inputs[Modality.AUDIO][6:], mask[6:]), rtol=1e-4, atol=1e-5)
    for rows in (slice(0, 3), slice(3, 6)):
        real = x[rows][mask[rows]]  # (frames of the speaker, M)
        # Over all his frames each band averages 0 and the values have unit variance ...
        torch.testing.assert_close(real.mean(0), torch.zeros(real.shape[1]), rtol=0, atol=1e-4)
        assert real.square().mean().item() == pytest.approx(1.0, rel=1e-3)
        # ... but not clip by clip: a clip keeps what sets it apart from his others.
        first = x[rows][0][mask[rows][0]]
        assert first.mean(0).abs().max() > 1e-3
    assert torch.all(x[~mask] == 0)


def test_a_speakers_gain_is_removed(tokenizer) -> None:
    """All of a speaker's clips 6 dB quieter: his normalised frames do not change."""
    data = _dataset()[:3]
    quiet = [Sample(audio=0.5 * s.audio, text=s.text, speaker=s.speaker) for s in data]
    outs = []
    for clips in (data, quiet):
        collator = Collator(tokenizer, **SETTINGS, speaker_norm=True)
        collator.fit_speakers([clips])
        outs.append(collator(clips).inputs[Modality.AUDIO])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_kept_frames_normalise_as_batched_ones(tokenizer) -> None:
    """Training items (keyed, their frames kept by index) read what evaluation items read. (The
    longest clip of a batch is left out: its last frames see the STFT's own end padding.)"""
    data = [*_dataset(), Sample(audio=_voice(40, 3000, 0.0), text="one")]
    collator = Collator(tokenizer, **SETTINGS, speaker_norm=True, cache_log_mel=True)
    collator.fit_speakers([data])
    keyed = [Sample(audio=s.audio, text=s.text, speaker=s.speaker, key=ItemKey(0, i)) for i, s in enumerate(data)]
    for _ in range(2):  # a miss, then a hit
        kept, batched = collator(keyed).inputs[Modality.AUDIO], collator(data).inputs[Modality.AUDIO]
        torch.testing.assert_close(kept[:-1], batched[:-1], rtol=1e-5, atol=1e-5)


def test_nothing_without_speaker_norm(tokenizer) -> None:
    collator = Collator(tokenizer, **SETTINGS)
    collator.fit_speakers([_dataset()])
    assert collator.speakers == {}


def test_config_checks() -> None:
    """Checked when a config is loaded: per-clip normalisation on top of the speaker's is refused."""
    with pytest.raises(ConfigError, match="model.encoders.audio.input_norm=false"):
        load_config(["speech"], ["model.encoders.audio.input_norm=true"])
    config = load_config(["speech"], ["data.manifest=train.jsonl"])  # the preset as it ships
    assert config.data.speaker_norm and not config.model.encoders["audio"]["input_norm"]


def test_a_run_measures_its_speakers_and_trains(tmp_path) -> None:
    """prepare_run measures every speaker of the manifest's splits; a short run then trains and
    its test figures come out (a clip without a speaker among them)."""
    import json

    import soundfile

    from polymodal.cli.main import main
    from polymodal.training.run import prepare_run

    lines = []
    for i in range(12):
        soundfile.write(tmp_path / f"{i}.wav", _voice(i, 3000, 0.9 if i % 3 == 0 else -0.4).numpy(), 8000)
        line = {"audio": f"{i}.wav", "text": ["one", "two"][i % 2], "label": i % 2}
        if i % 3:
            line["speaker"] = "ann" if i % 3 == 1 else "bob"
        lines.append(json.dumps(line))
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    overrides = [
        f"run_dir={tmp_path / 'run'}", "data.source=manifest", f"data.manifest={manifest}", "model.tasks=[audio_to_text]",
        "data.speaker_norm=true", "model.encoders.audio.input_norm=false", "train.steps=3", "train.progress=false",
    ]  # fmt: skip
    run = prepare_run(load_config(["tiny"], overrides), tmp_path / "prepared", resume=False)
    assert set(run.collator.speakers) == {"ann", "bob"}
    assert main(["train", "--config", "tiny", *overrides]) == 0
    assert (tmp_path / "run" / "eval.json").is_file()
