"""Golden outputs: the shipped presets' models compute the same function as when the files in
``golden/`` were written (1e-5), so a refactor that claims "behaviour unchanged" is checked.

Every parameter is set from a generator seeded by its NAME (not by construction order), so moving
parts between modules changes nothing as long as each parameter keeps its name, or ``RENAMED``
maps its new name to the one it had (the architecture step moved every part; the map records how). Inputs come from a seeded generator too; only the outputs are
stored. Rewrite the files (after a change that is MEANT to change outputs) with
``POLYMODAL_WRITE_GOLDEN=1 python -m pytest tests/models/test_golden.py``.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from batches import SHAPES, make_batch
from torch import Tensor, nn

from polymodal.config import load_config
from polymodal.data.batch import Batch
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

GOLDEN_DIR = Path(__file__).parent / "golden"
WRITE = os.environ.get("POLYMODAL_WRITE_GOLDEN") == "1"
TOLERANCE = 1e-5
NEW_TOKENS = 8
# Per architecture, (new prefix, the prefix it had when the golden files were written), first match wins.
RENAMED: dict[str, list[tuple[str, str]]] = {
    "any_to_any": [
        ("inputs.encoders.", "encoders."),
        ("inputs.projectors.", "projectors."),
        ("inputs.type_embed.", "modality_embed."),
        ("heads.text.embed.", "text_embed."),
        ("heads.image.tokenizer.", "image_tokenizer."),
        ("heads.image.", ""),
        ("heads.audio.", ""),
        ("tasks.contrastive.", ""),
    ],
    "clip": [
        ("inputs.encoders.", "encoders."),
        ("inputs.projectors.", "projectors."),
        ("inputs.type_embed.", "modality_embed."),
        ("contrastive.embed_heads.", "heads."),
        ("contrastive.", ""),
    ],
}
# Buffers that hold the data's statistics (from SHAPES), not weights.
DATA_STATISTICS = ("heads.audio.center", "heads.audio.scale")


def old_name(name: str, architecture: str) -> str:
    for new, old in RENAMED.get(architecture, []):
        if name.startswith(new):
            return old + name[len(new) :]
    return name


def _seeded_value(name: str, like: Tensor, built: Tensor) -> Tensor:
    """A value for the tensor called ``name``, drawn from a generator seeded by the name alone.

    Matrices get N(0, 1/fan_in); a tensor of several values the model initialises to a constant c
    gets c + 0.05 * max(|c|, 1) * N(0, 1) (norm gains near 1, biases near 0); other vectors and
    scalars N(0, 0.1^2) (a scalar's own initial value may be a random draw).
    """
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    if like.ndim >= 2:
        return (noise / (like[0].numel() ** 0.5)).to(like.dtype)
    flat = built.flatten()
    if flat.numel() > 1 and bool((flat == flat[0]).all()):
        constant = float(flat[0])
        return (constant + 0.05 * max(abs(constant), 1.0) * noise).to(like.dtype)
    return (0.1 * noise).to(like.dtype)


def set_seeded_weights(model: nn.Module, architecture: str) -> None:
    """Every float parameter and buffer from ``_seeded_value`` (by its name when the files were
    written); an EMA codebook's running sums follow its codebook (a count of one per code, as the
    quantiser starts)."""
    with torch.no_grad():
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not name.endswith((".code_sum", ".cluster_size", *DATA_STATISTICS)):
                tensor.copy_(_seeded_value(old_name(name, architecture), tensor, tensor.detach().clone()))
        for name, tensor in tensors.items():
            if name.endswith(".code_sum"):
                tensor.copy_(tensors[name[: -len("code_sum")] + "codebook"])


def _padded(rows: list[list[int]]) -> Tensor:
    """Generated id lists -> (B, max length) long, -1 after each row's end."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def any_to_any_outputs(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    model.eval()
    with torch.no_grad():
        for modality in (Modality.IMAGE, Modality.AUDIO):
            # Greedy, as when the files were written: a preset's beams are a decoding setting, not the
            # model's function (beam search has its own tests, tests/heads/test_text_head.py).
            generated = model.generate(
                modality, Modality.TEXT, batch.inputs[modality], batch.masks.get(modality), max_new_tokens=NEW_TOKENS, num_beams=1
            )
            out[f"generate_text_from_{modality}"] = _padded(generated)
        for modality in Modality:
            out[f"embed_{modality}"] = model.embed(modality, batch.inputs[modality], batch.masks.get(modality))
        drawing, speech = batch.references[Modality.IMAGE], batch.references[Modality.AUDIO]
        source, source_mask = model.encode(Modality.TEXT, drawing.ids, drawing.mask)
        out["generate_image_codes"] = model.head(Modality.IMAGE).generate_codes(model, source, source_mask)
        out["generate_image"] = model.generate(Modality.TEXT, Modality.IMAGE, drawing.ids, drawing.mask)
        out["generate_audio"] = model.generate(Modality.TEXT, Modality.AUDIO, speech.ids, speech.mask)
    model.train()
    torch.manual_seed(0)
    step = model(batch)
    out.update({f"loss/{name}": value.detach() for name, value in step.losses.items()})
    return out


def clip_outputs(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    model.eval()
    with torch.no_grad():
        for modality in Modality:
            out[f"embed_{modality}"] = model.embed(modality, batch.inputs[modality], batch.masks.get(modality))
    model.train()
    torch.manual_seed(0)
    out.update({f"loss/{name}": value.detach() for name, value in model(batch).losses.items()})
    return out


def image_tokenizer_outputs(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    images = batch.inputs[Modality.IMAGE]
    model.eval()
    with torch.no_grad():
        out = {"codes": model.tokenizer.encode(images), "reconstruct": model.tokenizer.reconstruct(images)}
    model.train()
    torch.manual_seed(0)
    out.update({f"loss/{name}": value.detach() for name, value in model(batch).losses.items()})
    return out


OUTPUTS = {"tiny": any_to_any_outputs, "default": any_to_any_outputs, "clip": clip_outputs, "vqvae": image_tokenizer_outputs}


@pytest.mark.parametrize("preset", sorted(OUTPUTS))
def test_preset_outputs_equal_the_golden_files(preset: str) -> None:
    torch.manual_seed(0)
    config = load_config([preset])
    model = build_model(config, SHAPES)
    set_seeded_weights(model, config.model.architecture)
    outputs = OUTPUTS[preset](model, make_batch())
    path = GOLDEN_DIR / f"{preset}.safetensors"
    if WRITE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        safetensors.torch.save_file({k: v.contiguous() for k, v in outputs.items()}, str(path))
        pytest.skip(f"wrote {path}")
    golden = safetensors.torch.load_file(str(path))
    assert sorted(outputs) == sorted(golden)
    for key, expected in golden.items():
        got = outputs[key]
        if expected.is_floating_point():
            torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE, rtol=TOLERANCE, msg=key)
        else:
            assert torch.equal(got, expected), key
