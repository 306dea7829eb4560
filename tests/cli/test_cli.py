"""The command line: configs, the one-line errors, and a tiny train -> eval -> resume round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from polymodal.cli.main import build_parser, main
from polymodal.cli.train import resolve
from polymodal.config import dump_config, load_config, preset_names
from polymodal.training.checkpoint import latest_checkpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # One dataset cache for the whole module keeps the built-in data build to once.
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "polymodal.cli.main", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_configs_lists_every_preset(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out
    assert main(["configs", "tiny"]) == 0
    assert "num_samples: 400" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--config", "tiny", "train.stepz=3"], "unknown config key 'train.stepz'; valid:"),
        (["train", "--config", "tiny", "model.projector.name=nope"], "unknown projector 'nope'; valid: cross_attention, linear, mlp, qformer"),
        (["train", "--config", "nosuch"], "unknown preset 'nosuch'; valid:"),
        (["eval", "/nonexistent/run"], "is not a run folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_train_eval_resume_leave_a_complete_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = [f"run_dir={run_dir}", "data.options.num_samples=200", "train.progress=false"]
    assert main(["train", "--config", "tiny", "train.steps=6", "train.ckpt_every=3", *common]) == 0

    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "tokenizer.json").is_file()
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert list((run_dir / "checkpoints").glob("*/model.safetensors"))
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.rglob("*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 6
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert set(figures) >= {"image_to_text", "audio_to_text", "text_to_image", "text_to_audio", "image_tokenizer"}
    assert 0.0 <= figures["image_to_text"]["exact"] <= 1.0
    assert set(figures["retrieval_image_to_text"]) == {"R@1", "R@5", "R@10", "count"}
    assert 0.0 <= figures["text_to_image"]["probe_correct"] <= 1.0
    assert 0.0 <= figures["text_to_audio"]["judge_accuracy_on_real_test"] <= 1.0
    # Stage 1 (the VQ-VAE) is a complete run of its own inside the run folder.
    assert json.loads((run_dir / "image_tokenizer" / "eval.json").read_text())["figures"]["reconstruction"]["psnr"] > 0
    assert {p.name for p in (run_dir / "samples").iterdir()} >= {"text_to_image.png", "text_to_audio_0.wav", "captions.txt"}

    # A second train into the same folder is refused rather than overwriting it.
    assert main(["train", "--config", "tiny", *common]) == 2

    # Resume extends the run from its checkpoint.
    assert main(["train", "--resume", f"run_dir={run_dir}", "train.steps=8"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 8

    capsys.readouterr()
    assert main(["eval", str(run_dir), "--limit", "16"]) == 0
    assert "image_to_text/exact" in capsys.readouterr().out

    _generate_every_route(run_dir, tmp_path, capsys)


def _generate_every_route(run_dir, tmp_path, capsys):
    import soundfile
    from PIL import Image

    png, wav = tmp_path / "forty_two.png", tmp_path / "forty_two.wav"
    assert main(["generate", str(run_dir), "--from", "text", "forty two", "--to", "image", "--out", str(png)]) == 0
    with Image.open(png) as image:
        assert image.size == (96, 32) and image.mode == "L"
    assert main(["generate", str(run_dir), "--from", "text", "forty two", "--to", "audio", "--out", str(wav)]) == 0
    samples, rate = soundfile.read(str(wav))
    assert rate == 16000 and 0 < len(samples) <= 2 * 16000 and abs(samples).max() > 0
    for source, path, *sampling in (("image", png), ("audio", wav, "--temperature", "0.8"), ("image", png, "--beams", "3")):
        capsys.readouterr()
        assert main(["generate", str(run_dir), "--from", source, str(path), "--to", "text", *sampling]) == 0
        assert capsys.readouterr().out.count("\n") == 1  # one line of text (a 6-step model's may be empty)
    assert main(["generate", str(run_dir), "--from", "text", "seven", "--to", "text"]) == 2
    assert main(["generate", str(run_dir), "--from", "image", str(png), "--to", "text", "--beams", "2", "--temperature", "0.5"]) == 2
    assert main(["generate", str(run_dir), "--from", "image", str(tmp_path / "missing.png"), "--to", "text"]) == 2


def test_train_an_image_tokenizer_leaves_reconstructions_and_codebook_figures(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "vq"
    args = [f"run_dir={run_dir}", "data.options.num_samples=200", "train.steps=3", "train.progress=false"]
    assert main(["train", "--config", "vqvae", *args]) == 0
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]["reconstruction"]
    assert figures["psnr"] > 0 and 0 < figures["code_usage"] <= 1 and figures["count"] > 0
    grid = Image.open(run_dir / "reconstructions.png")
    assert grid.size[0] > grid.size[1] > 0
    assert (run_dir / "checkpoints" / "latest").is_file()
    # export: the latest checkpoint's weights as one file, tensor for tensor
    out = tmp_path / "exported" / "vq.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    saved = safetensors.torch.load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    exported = safetensors.torch.load_file(str(out))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    assert main(["export", str(run_dir), "--checkpoint", "newest"]) == 2  # a one-line error naming the choices


def test_a_selected_augmented_speech_run_scores_a_manifest_by_speaker(tmp_path, capsys):
    """Train audio -> text with the audio chain and SpecAugment on and the best checkpoint kept by
    a val figure; `eval` then uses that checkpoint, and scores a manifest of clips broken down by
    a field of its lines."""
    import soundfile

    from polymodal.training.run import load_run
    from polymodal.training.selection import read_best

    run_dir = tmp_path / "speech"
    args = [
        f"run_dir={run_dir}", "data.options.num_samples=100", "model.tasks=[audio_to_text]", "train.steps=6",
        "train.eval_every=2", "train.select=audio_to_text/exact", "train.early_stop=1", "train.progress=false",
        "data.augment.audio.speed_p=0.5", "data.augment.audio.noise_p=0.5", "data.augment.audio.spec_augment_p=0.5",
    ]  # fmt: skip
    assert main(["train", "--config", "tiny", *args]) == 0
    best = read_best(run_dir)
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert figures["selected"] == best and best["figure"] == "audio_to_text/exact"
    assert load_run(run_dir).checkpoint.endswith("best")
    lines = []
    for i, speaker in enumerate(("ann", "bob", "ann")):
        t = torch.arange(4000) / 16000
        soundfile.write(tmp_path / f"{i}.wav", (0.3 * torch.sin(2 * torch.pi * (300 + 100 * i) * t)).numpy(), 16000)
        lines.append(json.dumps({"audio": f"{i}.wav", "label": i, "speaker": speaker}))
    (tmp_path / "real.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--manifest", str(tmp_path / "real.jsonl"), "--by", "speaker"]) == 0
    out = capsys.readouterr().out
    assert "audio_to_text" in out and "speaker=ann" in out and "speaker=bob" in out
    saved = json.loads((run_dir / "eval_real.json").read_text())
    assert saved["checkpoint"].endswith("best") and saved["figures"]["audio_to_text"]["count"] == 3
    assert main(["eval", str(run_dir), "--by", "speaker"]) == 2  # --by needs --manifest


def test_a_resumed_run_reads_its_overrides_against_its_own_config(tmp_path):
    """`--resume` with a setting only the run's own head has: checked against the run's saved
    config, not the default preset's (whose `aligned_vq` head refused `candidates`)."""
    run_dir = tmp_path / "mq"
    run_dir.mkdir()
    dump_config(load_config(["metaquery"], [f"run_dir={run_dir}"]), run_dir / "config.yaml")
    args = build_parser().parse_args(["train", "--resume", f"run_dir={run_dir}", "model.heads.image.candidates=2", "train.steps=7"])
    config = resolve(args)
    assert config.model.heads["image"]["candidates"] == 2 and config.train.steps == 7
    assert config.model.heads["image"]["name"] == "flow_matching_codes"


def test_overrides_may_follow_an_option():
    """`train run_dir=R --resume a=1 --config x b=2`: every key=value reaches the overrides in the
    order given, wherever the options fall; a stray word or unknown option is still refused."""
    parse = build_parser().parse_args
    args = parse(["train", "run_dir=r", "--resume", "train.steps=9", "--config", "clip", "seed=3"])
    assert args.resume and args.config == ["clip"]
    assert args.overrides == ["run_dir=r", "train.steps=9", "seed=3"]
    assert parse(["train", "--resume", "run_dir=r", "seed=3"]).overrides == ["run_dir=r", "seed=3"]
    for bad in (["train", "run_dir=r", "--resume", "stray"], ["train", "run_dir=r", "--nope"], ["eval", "r", "--limit", "3", "x=1"]):
        with pytest.raises(SystemExit) as stopped:
            parse(bad)
        assert stopped.value.code == 2
