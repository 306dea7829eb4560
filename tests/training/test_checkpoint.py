"""Checkpoints: exact round trip (tied weights, optimiser, scheduler, RNGs), weights_only loading,
atomic writes under failure, pruning, and clear errors for missing or corrupt files."""

import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from polymodal.config import TrainConfig
from polymodal.errors import RunError
from polymodal.training import checkpoint as ckpt
from polymodal.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from polymodal.training.optim import build_optimizer, build_scheduler


class _Tied(nn.Module):
    """A tiny LM with the output head tied to the embedding, a norm and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))  # (B, L) -> (B, L, 11)


CFG = TrainConfig(lr=1e-2, steps=10, warmup_steps=2)


def _trained(seed: int):
    torch.manual_seed(seed)
    model = _Tied()
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG)
    for _ in range(3):
        model(torch.randint(0, 11, (2, 5))).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.seen.fill_(3.0)
    return model, opt, sched


def _assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_state(x, y)
    else:
        assert a == b


def test_round_trip_restores_identical_state(tmp_path):
    model, opt, sched = _trained(seed=0)
    path = save_checkpoint(
        tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, extra_state={"data_position": 48}
    )
    assert path == tmp_path / "checkpoints" / "step_0000003"

    other, other_opt, other_sched = _trained(seed=1)
    assert not torch.equal(other.embed.weight, model.embed.weight)
    extra = load_checkpoint(tmp_path, model=other, optimizer=other_opt, scheduler=other_sched)

    assert extra == {"step": 3, "data_position": 48}
    _assert_same_state(model.state_dict(), other.state_dict())
    _assert_same_state(opt.state_dict(), other_opt.state_dict())
    _assert_same_state(sched.state_dict(), other_sched.state_dict())
    assert other.head.weight is other.embed.weight  # the tie survives loading
    # One more identical step on both keeps them identical: the optimiser moments were restored.
    for m, o in ((model, opt), (other, other_opt)):
        m(torch.arange(5)[None]).square().mean().backward()
        o.step()
    _assert_same_state(model.state_dict(), other.state_dict())


def test_files_load_safely_without_pickle(tmp_path):
    model, opt, sched = _trained(seed=0)
    path = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, extra_state={"x": [1, 2]})
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 3 and set(state["rng"]) >= {"torch", "python", "numpy"}
    weights = safetensors.torch.load_file(path / "model.safetensors")
    # The tied matrix is stored once; everything else under its own name.
    assert set(weights) | {"head.weight", "embed.weight"} == set(model.state_dict())
    for name, tensor in weights.items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_rng_states_are_restored(tmp_path):
    model, opt, sched = _trained(seed=0)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_state={})
    first = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    load_checkpoint(tmp_path, model=model)  # restore_rng=False leaves the streams alone
    assert not torch.equal(torch.rand(4), first[0])
    load_checkpoint(tmp_path, model=model, restore_rng=True)
    again = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(first[0], again[0])
    assert first[1] == again[1]
    np.testing.assert_array_equal(first[2], again[2])
    assert first[3] == again[3]


def _write_fails_in(target: str, monkeypatch) -> None:
    """Make one step of a checkpoint write fail as a full disk or a read-only folder would."""

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    if target == "model":  # safetensors reports a full disk as its own error type
        def serialise(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(ckpt.safetensors.torch, "save_model", serialise)
    elif target == "state":  # torch.save reports it as a RuntimeError about the zip writer
        def zip_writer(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        monkeypatch.setattr(ckpt.torch, "save", zip_writer)
    elif target == "fsync":
        monkeypatch.setattr(ckpt.os, "fsync", no_space)
    elif target == "mkdir":
        monkeypatch.setattr(ckpt.Path, "mkdir", read_only)
    else:  # "latest": the folder is in place, the pointer cannot be replaced
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "latest":
                no_space()
            real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)


@pytest.mark.parametrize("target", ["model", "state", "fsync", "mkdir", "latest"])
def test_failed_write_leaves_previous_checkpoint_and_latest(tmp_path, monkeypatch, target):
    model, opt, sched = _trained(seed=0)
    first = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_state={"s": 1})
    saved_weights = (first / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.norm.weight.add_(1.0)  # step 2's weights differ from step 1's

    _write_fails_in(target, monkeypatch)
    with pytest.raises(RunError) as caught:
        save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, extra_state={"s": 2})
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message and "could not write checkpoint" in message and "step_0000002" in message
    assert f"{first}, is intact" in message

    ckpt_dir = tmp_path / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_0000001"
    assert latest_checkpoint(tmp_path) == first
    assert not list(ckpt_dir.glob(".tmp-*"))
    assert (first / "model.safetensors").read_bytes() == saved_weights
    assert load_checkpoint(tmp_path, model=_trained(seed=1)[0])["s"] == 1
    # The next save works and replaces whatever the failed one left.
    save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, extra_state={"s": 2})
    assert load_checkpoint(tmp_path, model=model)["s"] == 2


def test_interrupt_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _trained(seed=0)
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_state={})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, extra_state={})
    monkeypatch.undo()
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_0000001"]


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    model, opt, sched = _trained(seed=0)
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_state={})
    ckpt_dir = tmp_path / "checkpoints"
    stale = ckpt_dir / ".tmp-step_0000002-12345"  # as a SIGKILL mid-save would leave it
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 10)
    (ckpt_dir / ".tmp-latest-12345").write_text("step_0000002\n")
    assert latest_checkpoint(tmp_path) == ckpt_dir / "step_0000001"
    save_checkpoint(tmp_path, step=2, model=model, optimizer=opt, scheduler=sched, extra_state={})
    assert not list(ckpt_dir.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == ckpt_dir / "step_0000002"


def test_keep_prunes_oldest_and_resave_replaces(tmp_path):
    model, opt, sched = _trained(seed=0)
    for step in (1, 2, 3, 4):
        save_checkpoint(
            tmp_path, step=step, model=model, optimizer=opt, scheduler=sched, extra_state={"s": step}, keep=2
        )
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_0000003", "step_0000004"]
    save_checkpoint(tmp_path, step=4, model=model, optimizer=opt, scheduler=sched, extra_state={"s": 40}, keep=2)
    assert load_checkpoint(tmp_path, model=model)["s"] == 40


def test_latest_falls_back_when_pointer_is_stale(tmp_path):
    model, opt, sched = _trained(seed=0)
    save_checkpoint(tmp_path, step=5, model=model, optimizer=opt, scheduler=sched, extra_state={})
    (tmp_path / "checkpoints" / "latest").write_text("step_0000009\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000005"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_missing_and_corrupt_checkpoints_name_the_path(tmp_path):
    model, opt, sched = _trained(seed=0)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path, model=model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent", model=model)

    path = save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_state={})
    state_bytes = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(state_bytes[: len(state_bytes) // 2])
    with pytest.raises(CheckpointError, match="state.pt is corrupt"):
        load_checkpoint(path, model=model, optimizer=opt)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match=str(path / "model.safetensors")):
        load_checkpoint(path, model=model)


def test_wrong_model_is_a_clear_error(tmp_path):
    model, opt, sched = _trained(seed=0)
    save_checkpoint(tmp_path, step=1, model=model, optimizer=opt, scheduler=sched, extra_state={})
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(tmp_path, model=nn.Sequential(nn.Linear(6, 6)))
    wider = _Tied()
    wider.norm = nn.LayerNorm(7)  # same names, another shape
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(tmp_path, model=wider)
