"""Scoring a manifest with a run (``polymodal eval --manifest``): the batched scores against each
item generated or embedded on its own, with lines made right or wrong by construction; the
breakdown by a field; unreadable lines counted apart; a caption read back by a dataset's parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from polymodal.config import load_config
from polymodal.data.manifest import ManifestDataset
from polymodal.data.text import TextTokenizer
from polymodal.datasets.base import build_source
from polymodal.datasets.spoken_numbers.numbers import parse_number
from polymodal.errors import DataError
from polymodal.evaluation.manifest import caption_judge, evaluate_manifest, format_table
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.training.run import Run, data_shapes, run_collator

RATE = 16000
TEXTS = ("zero", "one", "two", "three")


def _write_clips(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        t = np.arange(int(RATE * (0.3 + 0.05 * i))) / RATE
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)
        soundfile.write(folder / f"c{i}.wav", wave.astype(np.float32), RATE, subtype="FLOAT")
        names.append(f"c{i}.wav")
    return names


def _run(tmp_path: Path, architecture: str, extra: tuple[str, ...] = ()) -> Run:
    """A freshly initialised tiny run on a manifest (its own texts), in eval mode."""
    _write_clips(tmp_path, 1)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"audio": "c0.wav", "text": t, "label": i}) + "\n" for i, t in enumerate(TEXTS)))
    overrides = [f"data.manifest={train}", "data.source=manifest", f"model.architecture={architecture}", "model.tasks=[audio_to_text]"]
    if architecture == "clip":
        overrides.append("model.contrastive={embed_dim: 16}")
    config = load_config(["tiny"], [*overrides, *extra])
    torch.manual_seed(0)
    source = build_source(config.data, config.seed)
    tokenizer = TextTokenizer.train(list(TEXTS) * 4, vocab_size=config.data.vocab_size)
    collator = run_collator(config, tokenizer, source)
    model = build_model(config, data_shapes(config, tokenizer, collator)).eval()
    return Run(config, tmp_path, source, tokenizer, collator, model)


def _alone(run: Run, dataset: ManifestDataset, index: int) -> str:
    batch = run.collator([dataset[index]])
    (ids,) = run.model.generate(Modality.AUDIO, Modality.TEXT, batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO], max_new_tokens=run.config.data.max_text_tokens)
    return run.tokenizer.decode(ids)


@torch.no_grad()
def test_speaker_norm_reads_the_manifests_own_speakers(tmp_path):
    """With data.speaker_norm, scoring a manifest first measures its speakers on their own clips;
    each batched item then reads as it does alone under those statistics."""
    run = _run(tmp_path, "any_to_any", ("data.speaker_norm=true", "model.encoders.audio.input_norm=false"))
    names = _write_clips(tmp_path, 6)
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({"audio": n, "speaker": "a" if i < 3 else "b"}) + "\n" for i, n in enumerate(names)))
    dataset = ManifestDataset.from_config(unlabelled, run.config.data)
    run.collator.fit_speakers([dataset])
    said = [_alone(run, dataset, i) for i in range(len(names))]
    run.collator.speakers.clear()
    lines = [{"audio": n, "text": said[i] if i % 2 == 0 else said[i] + " x", "speaker": "a" if i < 3 else "b"} for i, n in enumerate(names)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = evaluate_manifest(run, manifest, batch_size=4)["audio_to_text"]
    assert set(run.collator.speakers) == {"a", "b"}
    assert figures["exact"] == pytest.approx(0.5) and figures["count"] == 6


@torch.no_grad()
def test_captions_scored_batched_equal_each_generated_alone(tmp_path):
    run = _run(tmp_path, "any_to_any")
    names = _write_clips(tmp_path, 6)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"audio": n}) + "\n" for n in names))
    dataset = ManifestDataset.from_config(probe, run.config.data)
    said = [_alone(run, dataset, i) for i in range(len(names))]
    # Lines 0, 2, 4 carry the caption the model says (right), 1, 3, 5 another (wrong); one line's file is missing.
    lines = [
        {"audio": n, "text": said[i] if i % 2 == 0 else said[i] + " x", "speaker": "a" if i < 3 else "b", "take": i}
        for i, n in enumerate(names)
    ]
    lines.append({"audio": "missing.wav", "text": "zero", "speaker": "b"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = evaluate_manifest(run, manifest, by=["speaker", "nothing"], batch_size=4)
    result = figures["audio_to_text"]
    assert (result["exact"], result["count"], result["unreadable"]) == (0.5, 6, 1)
    assert result["by"]["speaker"] == {"a": {"exact": 2 / 3, "count": 3}, "b": {"exact": 1 / 3, "count": 3}}
    assert result["by"]["nothing"] == {"(none)": {"exact": 0.5, "count": 6}}
    assert any("speaker=a" in line for line in format_table(figures))


def test_a_caption_names_a_label_by_the_parser_or_by_the_manifests_texts(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in [
            {"text": "three", "label": 3}, {"text": "3", "label": 3}, {"text": "four", "label": 4}, {"text": "plain"},
        ])  # fmt: skip
    )
    dataset = ManifestDataset(tmp_path / "m.jsonl", image_height=8, image_width=8, sample_rate=RATE, max_audio_seconds=1.0)
    parsed = caption_judge(dataset, parse_number)
    assert parsed(0, "the number three") and parsed(2, "4") and not parsed(2, "three")
    as_text = caption_judge(dataset, None)
    assert as_text(0, "3") and as_text(1, "three") and not as_text(0, "the number three")
    assert as_text(3, "plain") and not as_text(3, "plain text")  # no label: its own caption


@torch.no_grad()
def test_zero_shot_equals_the_nearest_label_text_computed_here(tmp_path):
    run = _run(tmp_path, "clip")
    names = _write_clips(tmp_path, 5)
    lines = [{"audio": n, "text": TEXTS[i % 3], "label": i % 3, "speaker": str(i % 2)} for i, n in enumerate(names)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = evaluate_manifest(run, manifest, by=["speaker"])["zero_shot_audio"]
    ids, mask = run.collator.source_texts(Modality.TEXT, list(TEXTS[:3]))
    classes = run.model.embed(Modality.TEXT, ids, mask).double()  # (3, E): one text per label here
    dataset = ManifestDataset.from_config(manifest, run.config.data)
    right = []
    for i in range(len(names)):
        batch = run.collator([dataset[i]])
        emb = run.model.embed(Modality.AUDIO, batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]).double()
        right.append(int((emb @ classes.T).argmax()) == lines[i]["label"])
    assert result["accuracy"] == pytest.approx(sum(right) / len(right))
    assert result["by"]["speaker"]["0"]["accuracy"] == pytest.approx(np.mean([right[i] for i in (0, 2, 4)]))


def test_a_figure_with_no_line_loaded_stops_and_names_the_file(tmp_path):
    run = _run(tmp_path, "any_to_any")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not a wave file")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "broken.wav", "text": "zero"}) + "\n")
    with pytest.raises(DataError, match=r"no line scored for audio_to_text could be loaded \(1 skipped\).*broken\.wav"):
        evaluate_manifest(run, manifest)
