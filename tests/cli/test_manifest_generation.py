"""Every generation task on the user's own data, from the command line: a tiny manifest of PNG
images, captions and WAV speech trains image->text, audio->text, text->image (learnable queries into
a flow-matching DiT) and text->audio (durations by monotonic alignment search), evaluates with
figures that need no judge, and generates every target; text->image also as VQ codes drawn one
after another (a first stage trains the VQ-VAE on the manifest's images), alone and told each
column's caption word by alignment search (``mas_vq``); the ``captioning`` preset
runs on audio + text pairs with ``data.manifest`` alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polymodal.cli.generate import generate
from polymodal.cli.main import main
from polymodal.modality import Modality
from polymodal.training.run import load_run

WORDS = ("red", "blue", "green", "small", "large", "circle", "square")
SAMPLE_RATE = 16000
# A small model for seconds of training: the parts of the ``tiny`` preset, the new heads small.
SMALL = [
    "data.image_height=16", "data.image_width=32", "data.num_mels=16", "data.max_audio_seconds=0.6", "data.vocab_size=300",
    "model.dim=32", "model.encoders={image: {name: cnn, dim: 16, num_stages: 2}, audio: {name: audio_conv, dim: 16}, text: {name: text_embedding, dim: 16}}",
    "model.backbone={name: transformer, num_layers: 1, num_heads: 2}", "model.contrastive={embed_dim: 16}",
    "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.progress=false", "train.loss_weights={}",
]  # fmt: skip
FLOW_HEADS = [
    "model.heads.image={name: flow_matching, patch_size: 8, num_queries: 4, dim_condition: 16, decoder: {dim: 32, num_layers: 1, num_heads: 2}, steps: 2}",
    "model.heads.audio={name: mas_mel, frames_per_token: 4, decoder: flow, flow: {dim: 32, num_layers: 1, num_heads: 2}, steps: 2}",
]


def _write_manifest(folder, count: int, *, images: bool = True) -> str:
    """``count`` lines: a caption of three words, a grey PNG with as many bars, a WAV of as many tones."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        words = [WORDS[j] for j in rng.integers(len(WORDS), size=3)]
        entry = {"text": " ".join(words), "audio": f"clip{i}.wav"}
        tones = np.concatenate([np.sin(2 * np.pi * (200 + 80 * WORDS.index(w)) * np.arange(3200) / SAMPLE_RATE) for w in words])
        soundfile.write(folder / entry["audio"], (0.3 * tones).astype(np.float32), SAMPLE_RATE)
        if images:
            pixels = np.zeros((16, 32), dtype=np.uint8)
            for k, w in enumerate(words):
                pixels[2:14, 2 + 10 * k : 4 + 10 * k + WORDS.index(w)] = 255
            Image.fromarray(pixels).save(folder / f"image{i}.png")
            entry["image"] = f"image{i}.png"
        lines.append(json.dumps(entry))
    path = folder / "my.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_every_generation_task_trains_on_a_manifest_and_generates(tmp_path, capsys):
    manifest = _write_manifest(tmp_path, 24)
    run_dir = tmp_path / "run"
    tasks = "model.tasks=[image_to_text, audio_to_text, text_to_image, text_to_audio, contrastive]"
    args = ["train", "--config", "tiny", "data.source=manifest", f"data.manifest={manifest}", f"run_dir={run_dir}", tasks, *SMALL, *FLOW_HEADS]
    assert main(args) == 0
    terms = set(json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0]))
    assert {"loss/text_to_image_flow_matching", "loss/text_to_audio_flow_matching", "loss/text_to_audio_duration"} <= terms
    assert not (run_dir / "image_tokenizer").exists()  # pixel space: no first stage
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert set(figures) >= {"image_to_text", "audio_to_text", "text_to_image", "text_to_audio"}
    image = figures["text_to_image"]
    assert image["count"] >= 2 and np.isfinite(image["frechet_pooled_pixels"]) and image["variety_l2"] > 0
    assert 0.0 <= image["own_retrieval_R@1"] <= 1.0
    assert np.isfinite(figures["text_to_audio"]["frechet_mel_statistics"]) and figures["text_to_audio"]["length_ratio"] > 0
    assert {p.name for p in (run_dir / "samples").iterdir()} >= {"text_to_image.png", "text_to_audio_0.wav"}

    capsys.readouterr()
    assert main(["generate", str(run_dir), "--from", "text", "red circle", "--to", "image", "--out", str(tmp_path / "a.png"), "--steps", "3"]) == 0
    assert Image.open(tmp_path / "a.png").size == (32, 16)
    assert main(["generate", str(run_dir), "--from", "text", "red circle", "--to", "audio", "--out", str(tmp_path / "a.wav")]) == 0
    assert soundfile.info(str(tmp_path / "a.wav")).samplerate == SAMPLE_RATE
    assert main(["generate", str(run_dir), "--from", "audio", str(tmp_path / "clip0.wav"), "--to", "text"]) == 0
    # An option the head does not take is named, not ignored.
    assert main(["generate", str(run_dir), "--from", "text", "red", "--to", "audio", "--guidance", "2"]) == 2


@pytest.mark.parametrize("name", ["vq_codes", "mas_vq"])
def test_text_to_image_as_vq_codes_trains_on_a_manifest_and_draws_from_the_cli(tmp_path, capsys, name):
    manifest = _write_manifest(tmp_path, 24)
    run_dir = tmp_path / "run"
    head = f"model.heads.image={{name: {name}, condition_dropout: 0.2, guidance: 2.0, top_k: 4}}"
    quick_stage_one = ["tokenizer_train.steps=2", "tokenizer_train.batch_size=8", "tokenizer_train.progress=false"]
    args = ["train", "--config", "tiny", "data.source=manifest", f"data.manifest={manifest}", f"run_dir={run_dir}", "model.tasks=[text_to_image]"]
    assert main([*args, *SMALL, *quick_stage_one, head]) == 0
    assert (run_dir / "image_tokenizer" / "eval.json").exists()  # the VQ-VAE trained first, on the manifest's images
    image = json.loads((run_dir / "eval.json").read_text())["figures"]["text_to_image"]
    assert image["count"] >= 2 and image["variety_l2"] > 0  # the head's configured sampling draws

    capsys.readouterr()
    made = []
    for _ in range(2):
        out = tmp_path / f"drawn{len(made)}.png"
        assert main(["generate", str(run_dir), "--from", "text", "red circle", "--to", "image", "--out", str(out), "--seed", "1"]) == 0
        made.append(np.asarray(Image.open(out)))
    assert made[0].shape == (16, 32) and np.array_equal(made[0], made[1])
    # Other seeds draw other codes. A first stage of 2 steps decodes any code to within a grey level
    # of the others (equal PNGs on some CPUs), so the drawn images are compared before rounding.
    loaded = load_run(run_dir)
    drawn = [generate(loaded, Modality.TEXT, Modality.IMAGE, "red circle", generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(*drawn)
    greedy = ["generate", str(run_dir), "--from", "text", "red circle", "--to", "image", "--temperature", "0", "--guidance", "1"]
    assert main([*greedy, "--out", str(tmp_path / "g1.png"), "--seed", "1"]) == 0
    assert main([*greedy, "--out", str(tmp_path / "g2.png"), "--seed", "2"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g1.png")), np.asarray(Image.open(tmp_path / "g2.png")))
    assert main(["generate", str(run_dir), "--from", "text", "red", "--to", "image", "--steps", "3"]) == 2  # a flow option


def test_the_captioning_preset_on_speech_and_captions_alone(tmp_path):
    manifest = _write_manifest(tmp_path, 20, images=False)
    run_dir = tmp_path / "captions"
    quick = ["train.steps=2", "train.batch_size=8", "train.progress=false", "data.vocab_size=300"]
    assert main(["train", "--config", "captioning", f"data.manifest={manifest}", f"run_dir={run_dir}", *quick]) == 0
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert figures["audio_to_text"]["count"] == 2 and figures["image_to_text"]["count"] == 0
    assert set(figures["retrieval_audio_to_text"]) >= {"R@1", "count"}


def test_the_captioning_preset_needs_only_a_manifest():
    from polymodal.config import load_config
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match="data.manifest: needed when data.source=manifest"):
        load_config(["captioning"])
    assert load_config(["captioning"], ["data.manifest=my.jsonl"]).data.source == "manifest"


def test_the_captioning_preset_reads_images_through_a_local_vision_tower(tmp_path, capsys):
    """The DINOv2-style path end to end: a tiny random ViT saved to a folder is the image encoder of
    the captioning preset, trains (frozen, the rest learning) and captions a PNG from the CLI."""
    transformers = pytest.importorskip("transformers")
    tower = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4)
    transformers.ViTModel(config).save_pretrained(tower)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tower)
    manifest = _write_manifest(tmp_path, 24)
    run_dir = tmp_path / "run"
    encoders = f"model.encoders:={{image: {{name: hf_image, path: {tower}}}, audio: {{name: audio_conv, dim: 16}}, text: {{name: text_embedding, dim: 16}}}}"
    small = [s for s in SMALL if not s.startswith("model.encoders=")]
    assert main(["train", "--config", "captioning", f"data.manifest={manifest}", f"run_dir={run_dir}", *small, encoders]) == 0
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert "image_to_text" in figures
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--from", "image", str(tmp_path / "image0.png"), "--to", "text"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one caption (two steps of training may make it empty)
    from polymodal.encoders.hf_image import HFImageEncoder
    from polymodal.training.run import load_run

    assert isinstance(load_run(run_dir).model.inputs.encoders["image"], HFImageEncoder)
