"""Offline embeddings: embed a tiny manifest, save, load, search; an indexed item queried finds itself
first. Once through the functions (a run built in memory), once through the command line (a run
trained for two steps by `polymodal train --config clip`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from polymodal.cli.embed import embed_manifest, load_index, save_index
from polymodal.cli.main import main
from polymodal.cli.search import search_index
from polymodal.config import load_config
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.modality import Modality
from polymodal.datasets.base import build_source
from polymodal.models.architectures import build_model
from polymodal.models.shapes import DataShapes, TextSpecials
from polymodal.training.run import Run

NUM_ITEMS = 7
TINY = ["model.dim=32", "model.backbone.num_layers=1", "model.backbone.num_heads=2", "model.encoders.image.num_stages=3"]


@pytest.fixture
def manifest(tmp_path):
    """NUM_ITEMS random grey PNGs with captions (and one caption-only line) in tmp_path/data."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(NUM_ITEMS):
        pixels = (rng.random((32, 96)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / "img" / f"{i}.png")
        lines.append({"image": f"img/{i}.png", "text": f"item number {i} of {NUM_ITEMS}", "label": i})
    lines.insert(3, {"text": "a caption without an image"})
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def tiny_run(manifest, run_dir) -> Run:
    torch.manual_seed(0)
    config = load_config(["clip"], [*TINY, "data.source=manifest", f"data.manifest={manifest}"])
    del config.model.encoders["audio"]
    texts = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
    tokenizer = TextTokenizer.train(texts, vocab_size=300)
    specials = TextSpecials(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    shapes = DataShapes(image_size=(32, 96), num_mels=config.data.num_mels, text=specials)
    model = build_model(config, shapes)
    return Run(config, run_dir, build_source(config.data, config.seed), tokenizer, build_collator(tokenizer, config.data), model)


def test_embed_save_load_search_round_trip(manifest, tmp_path):
    run = tiny_run(manifest, tmp_path / "run")
    index = embed_manifest(run, manifest, Modality.IMAGE, batch_size=3, progress=False)
    # The caption-only line (entry 3) has no image: skipped, and the ids keep the manifest positions.
    assert index.ids.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert index.paths[3] == "img/3.png"
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(NUM_ITEMS))
    # Batches of 3 embed like one batch of everything.
    whole = embed_manifest(run, manifest, Modality.IMAGE, batch_size=64, progress=False)
    torch.testing.assert_close(whole.embeddings, index.embeddings, rtol=1e-5, atol=1e-6)

    path = save_index(tmp_path / "index.safetensors", index)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("embeddings").dtype == torch.float32
        assert handle.get_tensor("ids").dtype == torch.int64
        assert handle.metadata()["modality"] == "image"
    loaded = load_index(path)
    assert torch.equal(loaded.embeddings, index.embeddings) and torch.equal(loaded.ids, index.ids)
    assert loaded.paths == index.paths

    for position, item in enumerate(index.ids.tolist()):
        query = str(manifest.parent / index.paths[position])
        hits = search_index(run, loaded, Modality.IMAGE, query, top_k=3)
        assert hits[0].id == item and hits[0].path == index.paths[position]
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].score >= hits[1].score >= hits[2].score

    texts = embed_manifest(run, manifest, Modality.TEXT, progress=False)
    assert texts.ids.tolist() == list(range(NUM_ITEMS + 1)) and texts.paths[3] == "a caption without an image"
    hits = search_index(run, texts, Modality.TEXT, "a caption without an image", top_k=2)
    assert hits[0].id == 3 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    cross = search_index(run, texts, Modality.IMAGE, str(manifest.parent / "img/0.png"), top_k=NUM_ITEMS + 5)
    assert len(cross) == NUM_ITEMS + 1  # top_k is capped at the index size


def test_command_line_round_trip(manifest, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", "data.source=manifest", f"data.manifest={manifest}", *TINY,
        "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
        "train.progress=false", "data.vocab_size=300",
    ]  # fmt: skip
    assert main(["train", "--config", "clip", *overrides]) == 0
    out = tmp_path / "index.safetensors"
    capsys.readouterr()
    assert main(["embed", str(run_dir), "--manifest", str(manifest), "--modality", "image", "--out", str(out)]) == 0
    assert f"embedded {NUM_ITEMS} image items" in capsys.readouterr().out
    assert main(["search", str(run_dir), str(out), "--image", str(manifest.parent / "img" / "5.png"), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"top 3 of {NUM_ITEMS} image items")
    assert lines[1].split()[:3] == ["1", "id", "6"] and lines[1].endswith("img/5.png")  # entry 6 is img/5.png
    assert main(["search", str(run_dir), str(out), "--text", "item number 5 of 7"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 5
