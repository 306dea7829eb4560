"""No code runs from a file: a crafted pickle placed as state.pt (one that writes a marker file when
unpickled, which it does under plain pickle) is refused with one line naming it, by the loader, by
--resume's fallback and by the CLI; search indexes are read through safetensors only."""

from __future__ import annotations

import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from polymodal.cli.embed import load_index
from polymodal.errors import DataError
from polymodal.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from polymodal.training.checkpoint_check import resumable_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from contract import assert_contract, run_cli  # noqa: E402


class WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: code chosen by whoever wrote the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted(path: Path, marker: Path, kind: str) -> Path:
    payload = {"format": 1, "step": 9, "optimizer": None, "scheduler": None, "rng": {}, "extra": WritesMarker(marker)}
    if kind == "torch_zip":  # torch.save's own format, as a real state.pt
        torch.save(payload, path)
    else:  # a bare pickle (protocol 2, the one torch's legacy reader expects)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


@pytest.mark.parametrize("kind", ["torch_zip", "bare_pickle"])
def test_the_crafted_file_runs_code_when_unpickled_plainly(tmp_path, kind):
    # The test's teeth: the file really is hostile.
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "state.pt", marker, kind)
    if kind == "torch_zip":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.fixture
def run_with_crafted_state(tiny_run, tmp_path):
    """A copy of the tiny run whose latest checkpoint's state.pt is crafted."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    marker = tmp_path / "marker"
    latest = latest_checkpoint(run_dir)
    _crafted(latest / "state.pt", marker, "torch_zip")
    return run_dir, latest, marker


@pytest.mark.parametrize("kind", ["torch_zip", "bare_pickle"])
def test_load_checkpoint_refuses_it_in_one_line_naming_the_file(tmp_path, kind):
    from torch import nn

    model = nn.Linear(2, 2)
    folder = tmp_path / "checkpoints" / "step_0000009"
    folder.mkdir(parents=True)
    import safetensors.torch

    safetensors.torch.save_model(model, str(folder / "model.safetensors"))
    marker = tmp_path / "marker"
    _crafted(folder / "state.pt", marker, kind)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(folder, model=model, restore_rng=True)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder / 'state.pt'} holds something other than tensors")
    assert not marker.exists()


def test_resume_moves_it_aside_and_eval_refuses_it(run_with_crafted_state, caplog):
    run_dir, latest, marker = run_with_crafted_state
    result = run_cli("eval", str(run_dir), "--limit", "2")
    assert_contract(result, "eval")
    assert result.status == 2 and str(latest / "state.pt") in result.err
    with caplog.at_level("WARNING", logger="polymodal.training.checkpoint_check"):
        assert resumable_checkpoint(run_dir) is None  # the tiny run has only this checkpoint
    assert (latest.parent / f"damaged-{latest.name}").is_dir()
    assert "holds something other than tensors" in caplog.records[0].getMessage()
    assert not marker.exists()


def test_search_indexes_are_read_through_safetensors_only(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    crafted = _crafted(tmp_path / "index.safetensors", marker, "torch_zip")
    with pytest.raises(DataError, match=f"{crafted} is not an index written by `polymodal embed`"):
        load_index(crafted)
    assert not marker.exists()

    # A real index loads with every pickle reader switched off.
    from polymodal.cli.embed import EmbeddingIndex, save_index

    index = EmbeddingIndex(torch.eye(3), torch.arange(3), ["a", "b", "c"], {"modality": "image"})
    path = save_index(tmp_path / "real.safetensors", index)

    def forbidden(*args, **kwargs):
        raise AssertionError("an index must not be unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = load_index(path)
    assert torch.equal(loaded.embeddings, index.embeddings) and loaded.paths == ["a", "b", "c"]
