"""Adding a task is one file: this one. It registers a head that reconstructs an image's pixels
through the shared backbone (one learned query per patch after the source, as MAE-style decoders
do) and the task ``image_to_image`` that uses it; the model, training loop and CLI take it as it is."""

from __future__ import annotations

import functools
import json

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.cli.main import main
from polymodal.config import load_config
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.models.shapes import DataShapes, TextSpecials
from polymodal.tasks import TASKS, GenerationTask

PATCH = 8


@HEADS.register("toy_pixels")
class PixelHead(nn.Module):
    """One learned query per PATCH x PATCH patch reads the source; a linear layer gives its pixels."""

    target = Modality.IMAGE
    reads_references = False
    needs_image_tokenizer = False

    def __init__(self, wiring: HeadWiring) -> None:
        super().__init__()
        height, width = wiring.shapes.image_size
        self.grid = (height // PATCH, width // PATCH)
        self.channels = wiring.shapes.image_channels
        self.queries = nn.Parameter(0.02 * torch.randn(self.grid[0] * self.grid[1], wiring.dim))
        self.to_pixels = nn.Linear(wiring.dim, self.channels * PATCH * PATCH)

    def _images(self, trunk, source: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor]:
        queries = self.queries.expand(source.shape[0], -1, -1)
        queries = queries + trunk.type_embedding(Modality.IMAGE, queries)
        every = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        hidden = trunk.run(source, source_mask, queries, every)
        patches = self.to_pixels(hidden[:, source.shape[1] :])  # (B, h * w, C * P * P)
        images = rearrange(patches, "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid[0], p=PATCH, q=PATCH)
        return hidden, images

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        hidden, images = self._images(trunk, source, source_mask)
        return HeadOutput(hidden, {"": (images - target.values).square().mean()})

    @torch.no_grad()
    def generate(self, trunk, source: Tensor, source_mask: Tensor) -> Tensor:
        return self._images(trunk, source, source_mask)[1].clamp(-1, 1)


TASKS.add("image_to_image", functools.partial(GenerationTask, Modality.IMAGE, Modality.IMAGE))

# ----------------------------------------------------------------------------- the checks

OVERRIDES = ["model.tasks=[image_to_image]", "model.heads.image={name: toy_pixels}"]


def test_the_new_task_trains_and_generates_through_the_shared_backbone():
    torch.manual_seed(0)
    config = load_config(["tiny"], OVERRIDES)
    model = build_model(config, DataShapes(image_size=(32, 96), num_mels=16, text=TextSpecials(40, 0, 1, 2)))
    images = torch.rand(4, 1, 32, 96) * 2 - 1
    from polymodal.data.batch import Batch

    batch = Batch({Modality.IMAGE: images}, {}, {Modality.IMAGE: torch.ones(4, dtype=torch.bool)}, torch.arange(4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = model(batch).losses["image_to_image"].item()
    for _ in range(30):
        optimizer.zero_grad()
        model(batch).losses["image_to_image"].backward()
        optimizer.step()
    assert model(batch).losses["image_to_image"].item() < 0.5 * first
    made = model.eval().generate(Modality.IMAGE, Modality.IMAGE, images)
    assert made.shape == images.shape and made.abs().max() <= 1.0
    # The backbone carried the reconstruction: a gradient reaches it from the new loss alone.
    model.train().zero_grad()
    model(batch).losses["image_to_image"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_the_command_line_trains_the_new_task(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", "data.options.num_samples=60", "train.steps=3", "train.progress=false", *OVERRIDES]
    assert main(["train", "--config", "tiny", *args]) == 0
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/image_to_image" in entry for entry in losses if entry["split"] == "train")
    assert not (run_dir / "image_tokenizer").exists()  # no head decodes with a VQ-VAE: one stage
