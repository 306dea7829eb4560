"""Which checkpoint --resume starts from: every kind of damage to the newest one (truncated or
padded weights, a corrupt header, a truncated or foreign state.pt) is found, the folder moved aside
with a warning naming the file, and the run resumed from the next one ends with bitwise the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch

from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.checkpoint_check import DAMAGED_PREFIX, checkpoint_problem, resumable_checkpoint
from polymodal.training.loop import fit

sys.path.insert(0, str(Path(__file__).parent))  # the toy run beside this file
from toy import Points, collate, toy_config, toy_model  # noqa: E402


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _damage(folder: Path, kind: str) -> str:
    """Damage a checkpoint folder; returns the text its warning must hold."""
    weights, state = folder / "model.safetensors", folder / "state.pt"
    data = weights.read_bytes()
    if kind == "truncated_weights":
        weights.write_bytes(data[:-7])
        return f"{weights} is {len(data) - 7} bytes where its header says {len(data)}"
    if kind == "padded_weights":
        weights.write_bytes(data + b"\0" * 5)
        return f"{weights} is {len(data) + 5} bytes where its header says {len(data)}"
    if kind == "cut_in_header":
        weights.write_bytes(data[:20])
        return f"{weights} is truncated: 20 bytes, but its header alone says {_header_length(weights)}"
    if kind == "corrupt_header":
        length = _header_length(weights)
        weights.write_bytes(data[:8] + b"x" * length + data[8 + length :])
        return f"{weights} has a corrupt safetensors header"
    if kind == "bad_offsets":  # valid JSON, same size, offsets pointing past the data
        length = _header_length(weights)
        header = json.loads(data[8 : 8 + length])
        header["linear.weight"]["data_offsets"] = [0, 4]  # 4 bytes for 4 floats
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= length
        weights.write_bytes(data[:8] + text.ljust(length) + data[8 + length :])
        return f"{weights} is "  # its size disagrees, or safetensors finds the offsets wrong
    if kind == "truncated_state":
        state.write_bytes(state.read_bytes()[:200])
        return f"{state} is corrupt or unreadable"
    if kind == "foreign_state":
        torch.save({"something": torch.zeros(2)}, state)
        return f"{state} is not a training state written by polymodal"
    assert kind == "pickled_code"
    state.write_bytes(pickle.dumps({"step": print}, protocol=2))
    return f"{state} holds something other than tensors"


KINDS = ["truncated_weights", "padded_weights", "cut_in_header", "corrupt_header", "bad_offsets", "truncated_state",
         "foreign_state", "pickled_code"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_the_newest_damaged_checkpoint_is_moved_aside(tmp_path, kind, caplog):
    config = toy_config(steps=8, ckpt_every=4)
    fit(toy_model(), Points(), collate, config, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    assert checkpoint_problem(ckpt_dir / "step_0000008") is None and checkpoint_problem(ckpt_dir / "step_0000004") is None
    expected = _damage(ckpt_dir / "step_0000008", kind)
    caplog.clear()  # the toy run's own warnings (its poisoned items)
    with caplog.at_level("WARNING", logger="polymodal.training.checkpoint_check"):
        assert resumable_checkpoint(tmp_path) == ckpt_dir / "step_0000004"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(expected) and "\n" not in warning
    assert (ckpt_dir / f"{DAMAGED_PREFIX}step_0000008").is_dir()
    assert (ckpt_dir / "latest").read_text().strip() == "step_0000004"
    assert resumable_checkpoint(tmp_path) == ckpt_dir / "step_0000004"  # nothing more to move


def test_resume_after_the_fallback_matches_an_uninterrupted_run(tmp_path):
    config = toy_config(steps=12, ckpt_every=4, keep_checkpoints=0)
    whole = toy_model()
    fit(whole, Points(), collate, config, tmp_path / "whole")
    # A run whose steps 8 and 12 are damaged: resuming from step 4 must replay the rest exactly.
    run_dir = tmp_path / "damaged"
    fit(toy_model(), Points(), collate, config, run_dir)
    for step, kind in ((8, "truncated_state"), (12, "corrupt_header")):
        _damage(run_dir / "checkpoints" / f"step_{step:07d}", kind)
    resumed = toy_model()
    fit(resumed, Points(), collate, config, run_dir, resume=True)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob(f"{DAMAGED_PREFIX}*")) == [
        "damaged-step_0000008", "damaged-step_0000012",
    ]  # fmt: skip
    assert latest_checkpoint(run_dir).name == "step_0000012"


def test_no_whole_checkpoint_left_is_a_clear_error(tmp_path):
    from polymodal.training.checkpoint import CheckpointError

    config = toy_config(steps=4, ckpt_every=4)
    fit(toy_model(), Points(), collate, config, tmp_path)
    _damage(tmp_path / "checkpoints" / "step_0000004", "truncated_weights")
    with pytest.raises(CheckpointError, match=r"resume: no checkpoint in .*checkpoints is whole; start without resuming"):
        fit(toy_model(), Points(), collate, config, tmp_path, resume=True)
