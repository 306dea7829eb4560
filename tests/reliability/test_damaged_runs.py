"""Damaged run folders through the command line: a truncated or corrupt checkpoint, a missing
config.yaml, a checkpoint of another architecture each end in one line naming the file (status 2);
`train --resume` falls back to the newest whole checkpoint, says so, and finishes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from polymodal.training.checkpoint import latest_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from contract import TINY_ANY_TO_ANY, assert_contract, run_cli  # noqa: E402


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    return run_dir


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("truncate_weights", "model.safetensors"),
        ("garbage_weights", "model.safetensors"),
        ("truncate_state", "state.pt"),
        ("no_config", "config.yaml"),
        ("bad_config", "config.yaml"),
        ("no_tokenizer", "tokenizer.json"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_damaged_run_is_one_line_naming_the_file(run_copy, damage, named, command):
    latest = latest_checkpoint(run_copy)
    if damage == "truncate_weights":
        _truncate(latest / "model.safetensors", 100)
    elif damage == "garbage_weights":
        (latest / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    elif damage == "truncate_state":
        _truncate(latest / "state.pt", 300)
    elif damage == "no_config":
        (run_copy / "config.yaml").unlink()
    elif damage == "bad_config":
        (run_copy / "config.yaml").write_text("train: [unclosed\n")
    else:
        (run_copy / "tokenizer.json").unlink()
    args = ["--limit", "2"] if command == "eval" else ["--from", "text", "seven", "--to", "text"]
    if command == "generate":
        args = ["--from", "image", str(run_copy / "samples" / "text_to_image.png"), "--to", "text"]
    result = run_cli(command, str(run_copy), *args)
    assert_contract(result, command)
    assert result.status == 2 and named in result.err, result.err


def test_a_checkpoint_of_another_architecture_is_one_line(run_copy, clip_run):
    latest = latest_checkpoint(run_copy)
    shutil.copy(latest_checkpoint(clip_run) / "model.safetensors", latest / "model.safetensors")
    result = run_cli("eval", str(run_copy), "--limit", "2")
    assert_contract(result, "eval")
    assert result.status == 2
    assert f"{latest / 'model.safetensors'} does not match the model" in result.err


@pytest.mark.slow  # two tiny trainings and an evaluation; tests/training/test_checkpoint_check.py is the fast one
def test_resume_falls_back_to_the_newest_whole_checkpoint(tmp_path, data_cache, caplog):
    run_dir = tmp_path / "run"
    common = [*TINY_ANY_TO_ANY, f"run_dir={run_dir}", "train.ckpt_every=2", "train.keep_checkpoints=3"]
    assert run_cli("train", *common).status == 0
    newest = latest_checkpoint(run_dir)
    assert newest.name == "step_0000004"
    _truncate(newest / "model.safetensors", 1000)
    with caplog.at_level("WARNING"):
        result = run_cli("train", "--resume", f"run_dir={run_dir}")
    assert result.status == 0, result.err
    warnings = [r.getMessage() for r in caplog.records if r.name == "polymodal.training.checkpoint_check"]
    assert len(warnings) == 1
    assert f"{newest / 'model.safetensors'} is truncated: 1000 bytes" in warnings[0]
    assert "resuming from the newest whole checkpoint" in warnings[0]
    assert (run_dir / "checkpoints" / "damaged-step_0000004").is_dir()
    # Steps 3 and 4 were trained again from step 2's checkpoint; the run is whole again.
    assert latest_checkpoint(run_dir).name == "step_0000004"
    assert run_cli("eval", str(run_dir), "--limit", "2").status == 0


def test_resume_without_config_is_one_line(run_copy):
    (run_copy / "config.yaml").unlink()
    result = run_cli("train", "--resume", f"run_dir={run_copy}")
    assert_contract(result, "train")
    assert result.status == 2 and str(run_copy / "config.yaml") in result.err
