"""Generated samples of a split: an image or speech for every caption, made by a trained run, kept
with what was asked for so a dataset's judges can score them (``DataSource.evaluate_generation``),
and written to ``samples/`` for a person to look at and listen to.

Speech is kept as a listener gets it: the generated log-mel through Griffin-Lim, cut after the
last voiced frame, and the log-mel a listener's ear would extract from that waveform (``heard``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polymodal.config import DataConfig
from polymodal.data.image import normalize_images
from polymodal.decoders.vocoder import GriffinLimVocoder, write_wav
from polymodal.evaluation.reconstruction import image_grid, save_png
from polymodal.modality import Modality

# A frame is voiced when its loudest mel band is above this (natural log of power): about -52 dB,
# well under speech (median band -8) and well over the silence floor (-23).
VOICED_LEVEL = -12.0
# Speech is made for the first this-many captions of a split: Griffin-Lim (32 iterations) costs
# about 0.15 s of CPU per 2 s clip, 5 minutes for a 2,000-item split on 2 cores.
SPEECH_EVAL_ITEMS = 500
GENERATION_BATCH = 250
SAMPLES_SHOWN = 8  # WAVs written; the image grid shows four times as many
PREVIEW_IMAGES = 32


@dataclasses.dataclass
class Generated:
    """Samples made from a split's captions, with what was asked for.

    Attributes:
        captions: the captions, as written in the split.
        labels: (N,) the items' labels.
        images: (N, C, H, W) in [-1, 1], for an image target.
        waveforms: (T_i,) each, cut after the speech, for an audio target.
        heard: (N, F, M) the log-mel of the vocoded speech; heard_mask (N, F) True up to the last
            voiced frame of each item.
    """

    captions: list[str]
    labels: Tensor
    images: Tensor | None = None
    waveforms: list[Tensor] = dataclasses.field(default_factory=list)
    heard: Tensor | None = None
    heard_mask: Tensor | None = None


def vocoder_for(data: DataConfig) -> GriffinLimVocoder:
    """The Griffin-Lim vocoder inverting the log-mel that ``data``'s collator extracts."""
    return GriffinLimVocoder(sample_rate=data.sample_rate, n_fft=data.n_fft, hop_length=data.hop_length, num_mels=data.num_mels)


def voiced_frames(log_mel: Tensor) -> Tensor:
    """(B, F, M) log-mel -> (B,) frames up to and including the last voiced one (at least 1)."""
    voiced = log_mel.amax(dim=-1) > VOICED_LEVEL  # (B, F)
    index = torch.arange(1, log_mel.shape[1] + 1, device=log_mel.device)  # (F,)
    return (voiced * index).amax(dim=1).clamp(min=1)


def caption_batches(dataset: Dataset, collate_fn, batch_size: int, limit: int | None):
    """(captions, labels) of the split's items that have a caption, in order, up to ``limit``."""
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        if Modality.TEXT not in batch.inputs:
            continue
        keep = batch.present[Modality.TEXT]
        if limit is not None:
            keep &= torch.arange(batch.size) < limit - seen
        if keep.any():
            ids = batch.inputs[Modality.TEXT][keep].tolist()
            yield [collate_fn.tokenizer.decode(row) for row in ids], batch.labels[keep]
        seen += int(keep.sum())
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def generate_from_captions(
    run, dataset: Dataset, target: Modality, *, limit: int | None = None, device="cpu", seed: int = 0
) -> Generated:
    """An image or speech (most likely codes, Griffin-Lim from ``seed``) for every captioned item.

    Args:
        run: a loaded run with an any-to-any model trained for text -> ``target``; its collator
            makes the model's input (``Collator.source_texts``: what the generator reads).
        limit: at most this many items; speech at most ``SPEECH_EVAL_ITEMS``.
    """
    model, collator = run.model, run.collator
    if target is Modality.AUDIO:
        limit = min(limit or SPEECH_EVAL_ITEMS, SPEECH_EVAL_ITEMS)
        vocoder = vocoder_for(run.config.data)
        generator = torch.Generator(device="cpu").manual_seed(seed)  # Griffin-Lim's start phases
    was_training = model.training
    model.eval()
    out = Generated(captions=[], labels=torch.zeros(0, dtype=torch.long))
    images, heard, heard_masks, labels = [], [], [], []
    for captions, batch_labels in caption_batches(dataset, collator, GENERATION_BATCH, limit):
        ids, mask = collator.source_texts(target, captions)
        made = model.generate(Modality.TEXT, target, ids.to(device), mask.to(device))
        if target is Modality.IMAGE:
            images.append(made.cpu())  # (B, C, H, W)
        else:
            mels = made.cpu()  # (B, F, M)
            frames = voiced_frames(mels)  # (B,)
            audio = vocoder(mels, generator=generator)  # (B, T)
            heard.append(collator.log_mel(audio)[:, : mels.shape[1]])  # what a listener's ear would extract
            heard_masks.append(torch.arange(mels.shape[1])[None, :] < frames[:, None])
            out.waveforms += [clip[: int(n) * vocoder.hop_length] for clip, n in zip(audio, frames)]
        out.captions += captions
        labels.append(batch_labels)
    model.train(was_training)
    out.labels = torch.cat(labels) if labels else out.labels
    if images:
        out.images = torch.cat(images)
    if heard:
        out.heard, out.heard_mask = _padded(heard), _padded(heard_masks)
    return out


def _padded(chunks: list[Tensor]) -> Tensor:
    """Batches of (B_i, F_i, ...) -> (sum B_i, max F_i, ...), zero (False) past each batch's length."""
    length = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, 0) * (c.ndim - 2) + (0, length - c.shape[1])) for c in chunks])


def write_samples(folder: Path, generated: dict[Modality, Generated], *, sample_rate: int, count: int = SAMPLES_SHOWN) -> list[Path]:
    """The first samples into ``folder``: ``text_to_image.png`` (a grid, in caption order),
    ``text_to_audio_<i>.wav``, and ``captions.txt`` naming what each was made from."""
    folder.mkdir(parents=True, exist_ok=True)
    written, lines = [], []
    images = generated.get(Modality.IMAGE)
    if images is not None and images.images is not None:
        written.append(save_png(image_grid(images.images[: 4 * count]), folder / "text_to_image.png"))
        lines += [f"text_to_image.png #{i}: {c}" for i, c in enumerate(images.captions[: 4 * count])]
    speech = generated.get(Modality.AUDIO)
    if speech is not None:
        for i, (clip, caption) in enumerate(zip(speech.waveforms[:count], speech.captions)):
            written.append(write_wav(folder / f"text_to_audio_{i}.wav", clip, sample_rate))
            lines.append(f"text_to_audio_{i}.wav: {caption}")
    if lines:
        (folder / "captions.txt").write_text("\n".join(lines) + "\n")
        written.append(folder / "captions.txt")
    return written


def write_dataset_preview(dataset: Dataset, out: Path, *, sample_rate: int, count: int = PREVIEW_IMAGES) -> list[Path]:
    """A grid of a dataset's first images (``samples.png``), its first clips as WAVs and their captions."""
    out.mkdir(parents=True, exist_ok=True)
    images, written, lines = [], [], []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        if sample is None:
            continue
        if sample.image is not None:
            images.append(normalize_images(sample.image))
        if sample.audio is not None and sum(p.suffix == ".wav" for p in written) < SAMPLES_SHOWN:
            written.append(write_wav(out / f"sample_{index}.wav", sample.audio, sample_rate))
        lines.append(f"{index}: {sample.text!r} label {sample.label}")
    if images and len({tuple(x.shape) for x in images}) == 1:
        written.append(save_png(image_grid(torch.stack(images)), out / "samples.png"))
    (out / "samples.txt").write_text("\n".join(lines) + "\n")
    return [*written, out / "samples.txt"]
