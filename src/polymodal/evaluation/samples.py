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
from polymodal.heads import generation_options
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
# Captions sampled several times each for the variety figures (``Generated.repeats``).
VARIETY_CAPTIONS = 16


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
        real: the same items' own target where they have one: images (N', C, H, W), or log-mels
            (N', F, M) with real_mask (N', F); real_index (N',) their rows in ``captions``.
        repeats: (V, R, ...) R samples (images, or generated log-mels) of each of the first V
            distinct captions, drawn with different noise; repeat_labels (V,) their labels.
    """

    captions: list[str]
    labels: Tensor
    images: Tensor | None = None
    waveforms: list[Tensor] = dataclasses.field(default_factory=list)
    heard: Tensor | None = None
    heard_mask: Tensor | None = None
    real: Tensor | None = None
    real_mask: Tensor | None = None
    real_index: Tensor | None = None
    repeats: Tensor | None = None
    repeat_labels: Tensor | None = None


def vocoder_for(data: DataConfig) -> GriffinLimVocoder:
    """The Griffin-Lim vocoder inverting the log-mel that ``data``'s collator extracts."""
    return GriffinLimVocoder(sample_rate=data.sample_rate, n_fft=data.n_fft, hop_length=data.hop_length, num_mels=data.num_mels)


def voiced_frames(log_mel: Tensor) -> Tensor:
    """(B, F, M) log-mel -> (B,) frames up to and including the last voiced one (at least 1)."""
    voiced = log_mel.amax(dim=-1) > VOICED_LEVEL  # (B, F)
    index = torch.arange(1, log_mel.shape[1] + 1, device=log_mel.device)  # (F,)
    return (voiced * index).amax(dim=1).clamp(min=1)


def hear(log_mels: Tensor, vocoder: GriffinLimVocoder, collate_fn, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Speech as a listener gets it: the vocoder's waveforms of ``log_mels`` (B, F, M), the log-mel
    ``collate_fn`` extracts from them (B, F, M), and the mask (B, F) of the frames up to each clip's
    last voiced one (``voiced_frames`` of ``log_mels``)."""
    frames = voiced_frames(log_mels)  # (B,)
    audio = vocoder(log_mels, generator=generator)  # (B, T)
    heard = collate_fn.log_mel(audio)[:, : log_mels.shape[1]]
    return audio, heard, torch.arange(log_mels.shape[1])[None, :] < frames[:, None]


def caption_batches(dataset: Dataset, collate_fn, batch_size: int, limit: int | None, target: Modality | None = None):
    """(captions, labels, real) of the split's items that have a caption, in order, up to
    ``limit``; ``real`` is (values, mask, present) of the items' own ``target`` (None without one)."""
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        if Modality.TEXT not in batch.inputs:
            continue
        keep = batch.present[Modality.TEXT]
        if limit is not None:
            keep &= torch.arange(batch.size) < limit - seen
        if keep.any():
            ids = batch.inputs[Modality.TEXT][keep].tolist()
            real = None
            if target is not None and target in batch.inputs:
                mask = batch.masks.get(target)
                real = (batch.inputs[target][keep], None if mask is None else mask[keep], batch.present[target][keep])
            yield [collate_fn.tokenizer.decode(row) for row in ids], batch.labels[keep], real
        seen += int(keep.sum())
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def generate_from_captions(
    run, dataset: Dataset, target: Modality, *, limit: int | None = None, device="cpu", seed: int = 0, repeats: int = 0
) -> Generated:
    """An image or speech for every captioned item, and the items' own targets beside them.

    The head's noise (a flow decoder's) and Griffin-Lim's phases are drawn from generators seeded
    with ``seed``; a head that samples nothing (most likely codes) ignores its generator.

    Args:
        run: a loaded run with an any-to-any model trained for text -> ``target``; its collator
            makes the model's input (``Collator.source_texts``: what the generator reads).
        limit: at most this many items; speech at most ``SPEECH_EVAL_ITEMS``.
        repeats: also this many samples of each of the first ``VARIETY_CAPTIONS`` distinct
            captions (``Generated.repeats``); 0: none.
    """
    model, collator = run.model, run.collator
    if target is Modality.AUDIO:
        limit = min(limit or SPEECH_EVAL_ITEMS, SPEECH_EVAL_ITEMS)
        vocoder = vocoder_for(run.config.data)
        phases = torch.Generator(device="cpu").manual_seed(seed)  # Griffin-Lim's start phases
    options = generation_options(model.head(target), generator=torch.Generator(device="cpu").manual_seed(seed))
    was_training = model.training
    model.eval()
    out = Generated(captions=[], labels=torch.zeros(0, dtype=torch.long))
    images, heard, heard_masks, labels, reals = [], [], [], [], []
    for captions, batch_labels, real in caption_batches(dataset, collator, GENERATION_BATCH, limit, target):
        ids, mask = collator.source_texts(target, captions)
        made = model.generate(Modality.TEXT, target, ids.to(device), mask.to(device), **options)
        if real is not None:
            reals.append((real, len(out.captions)))
        if target is Modality.IMAGE:
            images.append(made.cpu())  # (B, C, H, W)
        else:
            audio, clips_heard, voiced = hear(made.cpu(), vocoder, collator, phases)  # what a listener's ear would extract
            heard.append(clips_heard)
            heard_masks.append(voiced)
            out.waveforms += [clip[: int(n) * vocoder.hop_length] for clip, n in zip(audio, voiced.sum(1))]
        out.captions += captions
        labels.append(batch_labels)
    out.labels = torch.cat(labels) if labels else out.labels
    if images:
        out.images = torch.cat(images)
    if heard:
        out.heard, out.heard_mask = _padded(heard), _padded(heard_masks)
    _keep_real(out, reals)
    if repeats:
        _repeat(run, out, target, repeats, device=device, seed=seed)
    model.train(was_training)
    return out


def _keep_real(out: Generated, reals: list) -> None:
    """The items' own targets (those that have one) into ``out.real`` / ``real_mask`` / ``real_index``."""
    values, masks, index = [], [], []
    for (inputs, mask, present), offset in reals:
        values.append(inputs[present])
        if mask is not None:
            masks.append(mask[present])
        index.append(offset + torch.nonzero(present).squeeze(1))
    if not values or not sum(len(v) for v in values):
        return
    if masks:
        out.real, out.real_mask = _padded(values), _padded(masks)
    else:
        out.real = torch.cat(values)
    out.real_index = torch.cat(index)


def _repeat(run, out: Generated, target: Modality, repeats: int, *, device, seed: int) -> None:
    """``repeats`` samples of each of the first ``VARIETY_CAPTIONS`` distinct captions, each
    draw from its own noise (one generator for them all), into ``out.repeats``."""
    first = {}
    for caption, label in zip(out.captions, out.labels.tolist()):
        first.setdefault(caption, label)
        if len(first) == VARIETY_CAPTIONS:
            break
    head = run.model.head(target)
    options = generation_options(head, generator=torch.Generator(device="cpu").manual_seed(seed + 1))
    made = []
    for caption in first:
        ids, mask = run.collator.source_texts(target, [caption] * repeats)
        made.append(run.model.generate(Modality.TEXT, target, ids.to(device), mask.to(device), **options).cpu())
    length = max(m.shape[1] for m in made) if target is Modality.AUDIO else None
    if length is not None:  # log-mels of one caption share a length; captions differ
        made = [torch.nn.functional.pad(m, (0, 0, 0, length - m.shape[1]), value=float(m.min())) for m in made]
    out.repeats = torch.stack(made)  # (V, R, ...)
    out.repeat_labels = torch.tensor(list(first.values()))


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
