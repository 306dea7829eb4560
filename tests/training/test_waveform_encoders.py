"""A pretrained speech encoder that reads waveforms (``hf_audio``, a tiny random wav2vec 2.0 saved
to a temporary folder) in a whole training run: the collator hands it (B, T) samples, its top
block trains, ``eval --manifest`` reads it back; frozen, with ``train.feature_cache=memory``, it
trains to bitwise the weights of the same run without the cache, while running only on items it
has not seen."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub during the tests

import numpy as np
import pytest
import safetensors.torch
import soundfile
import torch

transformers = pytest.importorskip("transformers")

from polymodal.config import load_config  # noqa: E402
from polymodal.data.keyed import TrainingItems  # noqa: E402
from polymodal.errors import ConfigError  # noqa: E402
from polymodal.modality import Modality  # noqa: E402
from polymodal.training.features import attach_feature_caches  # noqa: E402
from polymodal.training.job import train  # noqa: E402
from polymodal.training.loop import fit  # noqa: E402
from polymodal.training.run import load_run, prepare_run  # noqa: E402

RATE = 16000
WORDS = ("one", "two", "three")
TINY_WAV2VEC2 = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
    conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    layerdrop=0.0, vocab_size=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def speech_folder(tmp_path_factory):
    """A tiny random wav2vec 2.0 and its feature extractor, and a manifest of 12 short clips."""
    root = tmp_path_factory.mktemp("hf_speech")
    torch.manual_seed(0)
    transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY_WAV2VEC2)).save_pretrained(root / "model")
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        t = np.arange(int(RATE * (0.2 + 0.02 * i))) / RATE
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * (i % 3)) * t) + 0.01 * rng.standard_normal(t.size)
        soundfile.write(root / f"c{i}.wav", wave.astype(np.float32), RATE, subtype="FLOAT")
        lines.append({"audio": f"c{i}.wav", "text": WORDS[i % 3], "label": i % 3, "speaker": f"s{i % 2}"})
    (root / "clips.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _config(root, run_dir, *, freeze: str, extra=()):
    return load_config(["tiny"], [
        "data.source=manifest", f"data.manifest={root / 'clips.jsonl'}", "data.max_audio_seconds=0.5",
        f"model.encoders.audio={{name: hf_audio, path: {root / 'model'}, freeze: {freeze}}}",
        "model.tasks=[audio_to_text]", f"run_dir={run_dir}", "train.steps=4", "train.batch_size=4",
        "train.ckpt_every=4", "train.progress=false", "train.precision=fp32", "device=cpu", *extra,
    ])  # fmt: skip


def test_a_waveform_encoder_trains_end_to_end_and_evaluates_a_manifest(speech_folder, tmp_path):
    from polymodal.evaluation.manifest import evaluate_manifest

    run_dir = tmp_path / "run"
    config = _config(speech_folder, run_dir, freeze="last_n")
    before = {k: v.clone() for k, v in prepare_run(config, tmp_path / "probe", resume=False).model.state_dict().items()}
    train(config)
    trained = safetensors.torch.load_file(str(run_dir / "checkpoints" / "step_0000004" / "model.safetensors"))
    top = [k for k in trained if "encoders.audio" in k and "encoder.layers.1." in k]
    bottom = [k for k in trained if "encoders.audio" in k and "feature_extractor" in k]
    assert top and bottom
    assert any(not torch.equal(trained[k], before[k]) for k in top)  # the top block learned
    assert all(torch.equal(trained[k], before[k]) for k in bottom)  # the frozen conv front end did not
    assert "audio_to_text" in json.loads((run_dir / "eval.json").read_text())["figures"]
    run = load_run(run_dir)
    assert run.collator.audio_input == "waveform"
    figures = evaluate_manifest(run, speech_folder / "clips.jsonl", by=["speaker"])
    assert figures["audio_to_text"]["count"] == 12 and set(figures["audio_to_text"]["by"]["speaker"]) == {"s0", "s1"}


def _fit(config, run_dir, *, cached: bool):
    torch.manual_seed(0)
    run = prepare_run(config, run_dir, resume=False)
    if cached:
        assert attach_feature_caches(run.model, config) == [Modality.AUDIO]
    items = TrainingItems(run.splits.train, seed=config.seed, sample_rate=config.data.sample_rate)
    fit(run.model, items, run.collator, config, run_dir)
    return run


def test_the_feature_cache_trains_as_the_encoder_does_and_runs_it_once_per_item(speech_folder, tmp_path):
    config = _config(speech_folder, tmp_path / "plain", freeze="frozen", extra=["train.steps=9"])
    plain = _fit(config, tmp_path / "plain", cached=False)
    cached_config = _config(speech_folder, tmp_path / "cached", freeze="frozen", extra=["train.steps=9", "train.feature_cache=memory"])
    cached = _fit(cached_config, tmp_path / "cached", cached=True)
    cache = cached.model.inputs.caches[Modality.AUDIO]
    num_items = len(cached.splits.train)
    assert cache.misses == num_items and cache.hits == 9 * 4 - num_items  # 36 items drawn, each computed once
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), cached.model.state_dict().items()):
        assert torch.equal(a, b), name
    augmented = _config(speech_folder, tmp_path / "x", freeze="frozen", extra=["train.feature_cache=memory", "data.augment.audio.gain_p=1.0"])
    with pytest.raises(ConfigError, match="augmented"):
        attach_feature_caches(prepare_run(augmented, tmp_path / "x", resume=False).model, augmented)
    trainable = _config(speech_folder, tmp_path / "y", freeze="last_n", extra=["train.feature_cache=memory"])
    with pytest.raises(ConfigError, match="no encoder of this model is fully frozen"):
        attach_feature_caches(prepare_run(trainable, tmp_path / "y", resume=False).model, trainable)
