"""A checkpoint that cannot be written ends the run with one line (status 2 from the CLI) and leaves
the previous checkpoint intact: simulated (the errors safetensors and torch.save really raise on a
full disk), and, where this machine lets the test mount one, on a real 2 MiB tmpfs that fills up."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

from polymodal.config import Config, TrainConfig
from polymodal.errors import RunError
from polymodal.models.output import StepOutput
from polymodal.training import checkpoint as ckpt
from polymodal.training.checkpoint import latest_checkpoint, load_checkpoint
from polymodal.training.loop import fit

sys.path.insert(0, str(Path(__file__).parent))
from contract import TINY_ANY_TO_ANY, assert_contract, run_cli  # noqa: E402

TMPFS_BYTES = 2 * 2**20
WIDE = 256  # a 256 x 256 layer: 256 KiB of weights, 768 KiB per checkpoint with Adam's moments


@dataclasses.dataclass
class Noise:
    x: torch.Tensor  # (B, WIDE)

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def to(self, device):
        return Noise(self.x.to(device))


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(WIDE, WIDE)

    def forward(self, batch: Noise) -> StepOutput:
        return StepOutput(losses={"mse": (self.layer(batch.x) - batch.x).square().mean()})


def _data() -> list[torch.Tensor]:
    return list(torch.randn(64, WIDE, generator=torch.Generator().manual_seed(0)))


def _config(**train) -> Config:
    settings = dict(steps=6, batch_size=8, ckpt_every=2, keep_checkpoints=0, precision="fp32", progress=False, log_every=1)
    return Config(seed=0, device="cpu", train=TrainConfig(**{**settings, **train}))


def _stack(items) -> Noise:
    return Noise(torch.stack(items))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at tmp_path/disk, or a skip where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        yield mount
    finally:  # lazily: a file object kept alive by the test's traceback may still be open there
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_ends_the_run_with_the_last_checkpoint_intact(small_disk):
    model = Wide()
    with pytest.raises(RunError) as caught:
        fit(model, _data(), _stack, _config(), small_disk / "run")
    message = str(caught.value)
    assert "\n" not in message and "could not write checkpoint" in message and "MiB free there" in message
    last = latest_checkpoint(small_disk / "run")
    assert last is not None and f"the previous checkpoint, {last}, is intact" in message
    assert not list((small_disk / "run" / "checkpoints").glob(".tmp-*"))
    assert load_checkpoint(last, model=Wide(), optimizer=None)["step"] == int(last.name.removeprefix("step_"))


@pytest.mark.parametrize("fails", ["model", "state"])
def test_a_failed_write_mid_run_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fails):
    # The errors a full disk really gives (seen on a tmpfs): a SafetensorError, a RuntimeError.
    calls = {"n": 0}
    real = {"model": ckpt.safetensors.torch.save_model, "state": ckpt.torch.save}

    def fail_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            if fails == "model":
                raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real[fails](*args, **kwargs)

    target = (ckpt.safetensors.torch, "save_model") if fails == "model" else (ckpt.torch, "save")
    monkeypatch.setattr(*target, fail_on_second)
    with pytest.raises(RunError, match=r"could not write checkpoint .*step_0000004 .*step_0000002, is intact"):
        fit(Wide(), _data(), _stack, _config(), tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_0000002"
    monkeypatch.undo()
    fit(Wide(), _data(), _stack, _config(), tmp_path, resume=True)  # room again: it carries on
    assert latest_checkpoint(tmp_path).name == "step_0000006"


@pytest.mark.slow  # a tiny two-stage training, then its resume and evaluation
def test_the_cli_reports_a_failed_write_in_one_line_and_resumes(tmp_path, data_cache, monkeypatch):
    run_dir = tmp_path / "run"
    saves = {"n": 0}
    real_save = ckpt.torch.save

    def third_save_fails(*args, **kwargs):  # stage 1 saves once, stage 2 at steps 2 and 4
        saves["n"] += 1
        if saves["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", third_save_fails)
    result = run_cli("train", *TINY_ANY_TO_ANY, f"run_dir={run_dir}", "train.ckpt_every=2")
    assert_contract(result, "train")
    assert result.status == 2
    assert "could not write checkpoint" in result.err and "step_0000002, is intact" in result.err
    monkeypatch.undo()
    assert run_cli("train", "--resume", f"run_dir={run_dir}").status == 0
    assert latest_checkpoint(run_dir).name == "step_0000004"
