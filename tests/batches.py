"""Synthetic inputs shared by tests: the shapes of a small any-to-any model and a seeded batch of
every modality with padding and aligned references (``make_batch``; the golden outputs are defined
on it, so it must not change)."""

from __future__ import annotations

import torch
from torch import nn

from polymodal.data.batch import AlignedTargets, Batch
from polymodal.modality import Modality
from polymodal.models.shapes import DataShapes, TextSpecials

BATCH, TEXT_LEN, FRAMES, NUM_MELS, VOCAB = 4, 7, 40, 16, 40
IMAGE_SIZE = (32, 96)
SPECIALS = TextSpecials(vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2)
# The built-in speech's log-mel statistics, which the mel head held as constants when the files were written.
SHAPES = DataShapes(
    image_size=IMAGE_SIZE, num_mels=NUM_MELS, text=SPECIALS, num_audio_frames=FRAMES, log_mel_center=-8.0, log_mel_scale=6.0
)


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


# Settings a head needs beyond ``tiny``'s: a VAE for the head that flows in its latent space.
HEAD_EXTRAS = {"flow_matching_latent": ["model.image_tokenizer={name: vae, channels: 16, num_res_blocks: 1, dim: 4}"]}


def head_config(name: str, *extra: str):
    """``tiny`` with one task, the one whose target the registered head ``name`` makes (from text, or
    image -> text for a text head), and that head; returns the config and the task's name."""
    from polymodal.config import load_config
    from polymodal.heads import HEADS

    target = HEADS.get(name).target
    task = "image_to_text" if target is Modality.TEXT else f"text_to_{target}"
    overrides = [f"model.tasks=[{task}]", f"model.heads.{target}={{name: {name}}}", *HEAD_EXTRAS.get(name, []), *extra]
    return load_config(["tiny"], overrides), task


def preset_needs(name: str) -> list[str]:
    """The overrides a shipped preset needs to load: a preset for the user's own data names no
    manifest (``data.manifest=...`` is the one thing its user adds), so tests give a path; the
    manifest is only read when a run starts."""
    from polymodal.config import preset_text

    return ["data.manifest=my.jsonl"] if "source: manifest" in preset_text(name) else []


def assert_task_pass_embeddings_equal_embed(model, batch: Batch) -> dict[Modality, torch.Tensor]:
    """Run ``model`` on ``batch`` (no gradients), capturing what the contrastive task projects for
    each modality, and check each equals ``model.embed`` over that source alone; returns ``embed``'s."""
    captured, alone = {}, {}
    original = model.contrastive.project

    def spy(modality, pooled):
        captured[modality] = original(modality, pooled)
        return captured[modality]

    model.contrastive.project = spy
    with torch.no_grad():
        model(batch)
        for modality in Modality:
            alone[modality] = model.embed(modality, batch.inputs[modality], batch.masks.get(modality))
            torch.testing.assert_close(captured[modality], alone[modality], atol=1e-5, rtol=1e-5)
    return alone


class Fixed(nn.Module):
    """A layer that returns ``value`` whatever its input: stands in for a head's learned layer
    (a prior's mean frames) so a test knows exactly what the layer says."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.value
