"""``model.init_from``: a fresh run starts from another run's tokenizer and the weights its model
shares with it; the rest is initialised exactly as without; a head that keeps the backbone frozen
leaves the loaded backbone as it was through training; a folder that is not a run, or a run whose
shared parts are configured otherwise, is refused by name."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.job import train
from polymodal.training.run import TOKENIZER_FILE, prepare_run

BASE = ["data.options.num_samples=120", "train.progress=false", "tokenizer_train.progress=false", "train.steps=3", "train.ckpt_every=3"]
FLOW_HEAD = (
    "model.heads.image={name: flow_matching, patch_size: 8, num_queries: 2, dim_condition: 32, train_backbone: false,"
    " read_source: true, steps: 2, decoder: {dim: 32, num_layers: 1, num_heads: 2}}"
)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A trained image->text run of the tiny model: (its folder, its checkpoint's weights)."""
    folder = tmp_path_factory.mktemp("init_from")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYMODAL_CACHE", str(folder / "cache"))
        run_dir = folder / "source"
        train(load_config(["tiny"], [*BASE, f"run_dir={run_dir}", "model.tasks=[image_to_text]"]))
    return run_dir, safetensors.torch.load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _prepared(run_dir, overrides):
    config = load_config(["tiny"], [*BASE, f"run_dir={run_dir}", *overrides])
    torch.manual_seed(config.seed)  # as the job seeds each stage's model
    return prepare_run(config, run_dir, resume=False)


def test_a_fresh_run_takes_the_tokenizer_and_every_shared_tensor(source_run, tmp_path, monkeypatch):
    source_dir, saved = source_run
    monkeypatch.setenv("POLYMODAL_CACHE", str(source_dir.parent / "cache"))
    wider = ["model.tasks=[image_to_text, text_to_image]", FLOW_HEAD]
    started = _prepared(tmp_path / "started", [*wider, f"model.init_from={source_dir}"])
    scratch = _prepared(tmp_path / "scratch", wider)

    assert (tmp_path / "started" / TOKENIZER_FILE).read_text() == (source_dir / TOKENIZER_FILE).read_text()
    own, fresh = started.model.state_dict(), scratch.model.state_dict()
    shared = [name for name in own if name in saved]
    assert any(n.startswith("backbone.") for n in shared) and any(n.startswith("inputs.encoders.image.") for n in shared)
    for name in shared:
        assert torch.equal(own[name], saved[name]), name
    loaded = {own[name].data_ptr() for name in shared}
    only_new = [name for name in own if own[name].data_ptr() not in loaded]  # a tied tensor is saved under one name
    assert any(n.startswith("heads.image.") for n in only_new)
    for name in only_new:  # initialised as a run from scratch initialises them (same seed, same vocabulary size)
        assert torch.equal(own[name], fresh[name]), name


def test_a_frozen_backbone_head_trains_on_the_loaded_backbone_and_leaves_it_as_it_was(source_run, tmp_path, monkeypatch):
    source_dir, saved = source_run
    monkeypatch.setenv("POLYMODAL_CACHE", str(source_dir.parent / "cache"))
    run_dir = tmp_path / "metaquery"
    train(load_config(["tiny"], [*BASE, f"run_dir={run_dir}", "model.tasks=[text_to_image]", FLOW_HEAD, f"model.init_from={source_dir}"]))

    after = safetensors.torch.load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    frozen = [n for n in after if n.startswith(("backbone.", "inputs.encoders.text.", "inputs.projectors.text."))]
    assert frozen
    for name in frozen:
        assert torch.equal(after[name], saved[name]), name
    heads = [n for n in after if n.startswith("heads.image.")]
    fresh = _prepared(tmp_path / "scratch", ["model.tasks=[text_to_image]", FLOW_HEAD]).model.state_dict()
    assert any(not torch.equal(after[n], fresh[n]) for n in heads)  # the new head did train


def test_a_folder_that_is_not_a_trained_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"model.init_from=.*not a trained run's folder \(no config.yaml or tokenizer.json\)"):
        _prepared(tmp_path / "run", [f"model.init_from={tmp_path / 'nothing'}", "model.tasks=[image_to_text]"])


def test_a_run_of_another_model_is_refused(source_run, tmp_path, monkeypatch):
    source_dir, _ = source_run
    monkeypatch.setenv("POLYMODAL_CACHE", str(source_dir.parent / "cache"))
    other = ["model.dim=48", "model.encoders.image.dim=24", "model.encoders.text.dim=24", "model.encoders.audio.dim=24"]
    with pytest.raises(ConfigError, match=r"model.init_from: \d+ tensors of .* have another shape here \(backbone.*model.dim"):
        _prepared(tmp_path / "run", [*other, "model.tasks=[image_to_text]", f"model.init_from={source_dir}"])
