"""Dataset plug-ins: every registered one offers the whole interface and is cheap to build (nothing
is read before ``load``); a manifest loads, describes and previews itself; a run folder loads for
generation without reading any data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polymodal.config import DataConfig, dump_config, load_config
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets import DATASETS, DataSource, build_source
from polymodal.modality import Modality
from polymodal.training.checkpoint import save_checkpoint
from polymodal.training.run import TOKENIZER_FILE, data_shapes, load_run

INTERFACE = [name for name in DataSource.__dict__ if not name.startswith("_") and name not in ("references_for", "label_parser")]


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_plugin_offers_the_whole_interface(name):
    cls = DATASETS.get(name)
    assert isinstance(cls.references_for, frozenset) and hasattr(cls, "label_parser")
    missing = [method for method in INTERFACE if not callable(getattr(cls, method, None))]
    assert not missing, f"{name} lacks {missing}"


@pytest.fixture
def manifest(tmp_path):
    lines = []
    for i in range(12):
        Image.fromarray((np.random.default_rng(i).random((20, 50)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        soundfile.write(tmp_path / f"{i}.wav", 0.3 * np.sin(np.arange(4000) * (0.05 + 0.01 * i)), 16000)
        lines.append({"image": f"{i}.png", "audio": f"{i}.wav", "text": f"item {i}", "label": i % 3})
    lines.append({"text": "only a caption"})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_a_manifest_loads_describes_and_previews_itself(manifest, tmp_path):
    source = build_source(DataConfig(manifest=str(manifest)), 0)
    splits = source.load()
    assert len(splits.train) + len(splits.val) == 13 and splits.val is splits.test
    assert set(splits.train_labels) <= {0, 1, 2} and source.label_parser is None
    assert "train:" in source.describe(splits) and "image:" in source.describe(splits)
    written = source.write_preview(splits, tmp_path / "preview")
    assert (tmp_path / "preview" / "samples.png") in written and any(p.suffix == ".wav" for p in written)
    collator = build_collator(TextTokenizer.train(splits.train_texts, vocab_size=300), DataConfig(manifest=str(manifest)))
    center, scale = source.log_mel_statistics(splits, collator)
    assert np.isfinite(center) and scale > 0
    assert source.source_text(Modality.AUDIO, " say this ") == "say this" and source.prompt_sets(Modality.IMAGE) == {}


def test_a_run_loads_and_generates_without_reading_its_data(tmp_path, monkeypatch):
    config = load_config(["tiny"], [f"run_dir={tmp_path}"])
    tokenizer = TextTokenizer.train(["forty two", "the number 7", "a handwritten 105"], vocab_size=300)
    tokenizer.save(tmp_path / TOKENIZER_FILE)
    dump_config(config, tmp_path / "config.yaml")
    from polymodal.models.architectures import build_model

    collator = build_collator(tokenizer, config.data)
    save_checkpoint(tmp_path, step=1, model=build_model(config, data_shapes(config, tokenizer, collator)), optimizer=None, scheduler=None, extra_state={})

    def refuse(self):
        raise AssertionError("load_run read the data")

    monkeypatch.setattr(DATASETS.get("spoken_numbers"), "load", refuse)
    run = load_run(tmp_path)
    ids, mask = run.collator.source_texts(Modality.AUDIO, ["42"])
    assert run.collator.tokenizer.decode(ids[0].tolist()) == "forty two"  # the built-in front end, no data
    images = run.model.eval().generate(Modality.TEXT, Modality.IMAGE, *run.collator.source_texts(Modality.IMAGE, ["42"]))
    assert images.shape == (1, 1, 32, 96) and torch.isfinite(images).all()
