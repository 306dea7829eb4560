"""Golden outputs: the shipped presets' models compute the same function as when the files in
``golden/`` were written (1e-5), so a refactor that claims "behaviour unchanged" is checked.

Every parameter is set from a generator seeded by its NAME (not by construction order), so moving
parts between modules changes nothing as long as each parameter keeps its name, or ``RENAMED``
maps its new name to the one it had. Inputs come from a seeded generator too; only the outputs are
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
from torch import Tensor, nn

from polymodal.config import load_config
from polymodal.data.batch import AlignedTargets, Batch
from polymodal.modality import Modality
from polymodal.models.build import DataShapes, build_model
from polymodal.models.any_to_any import TextSpecials

GOLDEN_DIR = Path(__file__).parent / "golden"
WRITE = os.environ.get("POLYMODAL_WRITE_GOLDEN") == "1"
TOLERANCE = 1e-5
BATCH, TEXT_LEN, FRAMES, NUM_MELS, VOCAB = 4, 7, 40, 16, 40
IMAGE_SIZE = (32, 96)
SPECIALS = TextSpecials(vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2)
SHAPES = DataShapes(image_size=IMAGE_SIZE, num_mels=NUM_MELS, text=SPECIALS, num_audio_frames=FRAMES)
# New parameter name -> the name it had when the golden files were written.
RENAMED: dict[str, str] = {}
NEW_TOKENS = 8


def _seeded_value(name: str, like: Tensor, built: Tensor) -> Tensor:
    """A value for the tensor called ``name``, drawn from a generator seeded by the name alone.

    Matrices get N(0, 1/fan_in); a tensor the model initialises to a constant c gets
    c + 0.05 * max(|c|, 1) * N(0, 1) (norm gains near 1, biases near 0); other vectors N(0, 0.1^2).
    """
    generator = torch.Generator().manual_seed(zlib.crc32(RENAMED.get(name, name).encode()))
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    if like.ndim >= 2:
        return (noise / (like[0].numel() ** 0.5)).to(like.dtype)
    flat = built.flatten()
    if flat.numel() and bool((flat == flat[0]).all()):
        constant = float(flat[0])
        return (constant + 0.05 * max(abs(constant), 1.0) * noise).to(like.dtype)
    return (0.1 * noise).to(like.dtype)


def set_seeded_weights(model: nn.Module) -> None:
    """Every float parameter and buffer from ``_seeded_value``; an EMA codebook's running sums
    follow its codebook (a count of one per code, as the quantiser starts)."""
    with torch.no_grad():
        tensors = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not name.endswith((".code_sum", ".cluster_size")):
                tensor.copy_(_seeded_value(name, tensor, tensor.detach().clone()))
        for name, tensor in tensors.items():
            if name.endswith(".code_sum"):
                tensor.copy_(tensors[name[: -len("code_sum")] + "codebook"])


def make_batch() -> Batch:
    """A batch of every modality with padding and aligned references, from a seeded generator."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (BATCH, TEXT_LEN), generator=g)
    ids[:, 0] = SPECIALS.bos_id
    text_mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    text_mask[0, 5:] = False
    ids[0, 5:] = SPECIALS.pad_id
    ids[0, 4] = ids[1:, -1] = SPECIALS.eos_id
    audio_mask = torch.ones(BATCH, FRAMES, dtype=torch.bool)
    audio_mask[1, 25:] = False
    every = torch.ones(BATCH, dtype=torch.bool)
    durations = torch.randint(2, 6, (BATCH, TEXT_LEN), generator=g).float().masked_fill(~text_mask, 0.0)
    speech_frames = int(durations.sum(1).max())
    speech_mask = torch.arange(speech_frames)[None, :] < durations.sum(1)[:, None]
    speech = AlignedTargets(
        ids=ids,
        mask=text_mask,
        durations=durations,
        values=(torch.randn(BATCH, speech_frames, NUM_MELS, generator=g) * 4 - 8).masked_fill(~speech_mask[:, :, None], 0.0),
        value_mask=speech_mask,
        present=every,
    )
    widths = text_mask.float() * torch.rand(BATCH, TEXT_LEN, generator=g)
    drawing = AlignedTargets(
        ids=ids,
        mask=text_mask,
        durations=IMAGE_SIZE[1] * widths / widths.sum(1, keepdim=True),
        values=torch.rand(BATCH, 1, *IMAGE_SIZE, generator=g) * 2 - 1,
        value_mask=torch.ones(BATCH, IMAGE_SIZE[1], dtype=torch.bool),
        present=every,
    )
    return Batch(
        inputs={
            Modality.IMAGE: torch.rand(BATCH, 1, *IMAGE_SIZE, generator=g) * 2 - 1,
            Modality.TEXT: ids,
            Modality.AUDIO: torch.randn(BATCH, FRAMES, NUM_MELS, generator=g).masked_fill(~audio_mask[:, :, None], 0.0),
        },
        masks={Modality.TEXT: text_mask, Modality.AUDIO: audio_mask},
        present={m: every.clone() for m in Modality},
        labels=torch.tensor([3, 3, 5, 8]),
        references={Modality.AUDIO: speech, Modality.IMAGE: drawing},
    )


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
            generated = model.generate_text(
                modality, batch.inputs[modality], batch.masks.get(modality), max_new_tokens=NEW_TOKENS
            )
            out[f"generate_text_from_{modality}"] = _padded(generated)
        for modality in Modality:
            out[f"embed_{modality}"] = model.embed(modality, batch.inputs[modality], batch.masks.get(modality))
        drawing, speech = batch.references[Modality.IMAGE], batch.references[Modality.AUDIO]
        out["generate_image_codes"] = model.generate_image_codes(drawing.ids, drawing.mask)
        out["generate_image"] = model.generate_image(drawing.ids, drawing.mask)
        out["generate_audio"] = model.generate_audio(speech.ids, speech.mask)
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
    model = build_model(load_config([preset]), SHAPES)
    set_seeded_weights(model)
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
