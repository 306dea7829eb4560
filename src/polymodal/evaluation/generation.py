"""Scoring generated images and speech: does a sample show (say) the number its caption asked for?

A judge is a probe classifier trained on REAL data only (``probes.py``): an ``ImageProbe`` on the
training split's images and an ``AudioProbe`` on its speech, each scored on the real test split
as well, so every figure comes with the ceiling its judge allows. Judges depend only on the data,
so they are cached under ``$POLYMODAL_CACHE`` (keyed by the data settings and the probe's steps):
the first evaluation trains them, later ones load them.

Speech is judged as a listener would get it: the generated log-mel is turned into a waveform by
Griffin-Lim, and the probe reads the log-mel of that waveform, cut after the last voiced frame.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from polymodal.config import DataConfig, to_dict
from polymodal.data.batch import Batch
from polymodal.data.cache import FORMAT_VERSION, cache_path
from polymodal.decoders.vocoder import GriffinLimVocoder
from polymodal.evaluation import probes
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

IMAGE_PROBE_STEPS = 800  # 1,200 steps gave 90.8% on real test images, at 1.5x the time
AUDIO_PROBE_STEPS = 600  # 97.4% on real test speech
# Speech is scored on the first this-many captions of a split: Griffin-Lim (32 iterations) costs
# about 0.15 s of CPU per 2 s clip, 5 minutes for a 2,000-item split on 2 cores.
SPEECH_EVAL_ITEMS = 500
JUDGE_VERSION = 2  # bump when a probe's architecture or training changes
# A frame is voiced when its loudest mel band is above this (natural log of power): about -52 dB,
# well under speech (median band -8) and well over the silence floor (-23).
VOICED_LEVEL = -12.0
# A judge trains for its step count or this many passes over its training split, whichever is
# fewer: on a small dataset more steps only memorise it (and a test's tiny run stays fast).
JUDGE_MAX_EPOCHS = 5
JUDGE_BATCH = 64


@dataclasses.dataclass
class Judges:
    """Probe classifiers trained on real data, and their accuracy on the real test split."""

    image: probes.ImageProbe
    audio: probes.AudioProbe
    image_accuracy: float
    audio_accuracy: float


def load_judges(
    data: DataConfig, seed: int, train_split: Dataset, test_split: Dataset, collate_fn: Callable[..., Batch]
) -> Judges:
    """The cached judges of this data, or train them (on ``train_split``) and cache them."""
    cap = max(1, JUDGE_MAX_EPOCHS * len(train_split) // JUDGE_BATCH)
    image_steps, audio_steps = min(IMAGE_PROBE_STEPS, cap), min(AUDIO_PROBE_STEPS, cap)
    params = {"data": to_dict(data), "seed": seed, "steps": [image_steps, audio_steps]}
    path = cache_path("judges", {**params, "version": JUDGE_VERSION, "format": FORMAT_VERSION}).with_suffix(
        ".safetensors"
    )
    image = probes.ImageProbe(image_height=data.image_height, max_digits=data.max_digits)
    audio = probes.AudioProbe(num_mels=data.num_mels, max_digits=data.max_digits)
    if path.is_file():
        tensors = safetensors.torch.load_file(str(path))
        image.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("image.")})
        audio.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("audio.")})
        accuracy = tensors["accuracy"].tolist()
        logger.info("judges loaded from %s (real test accuracy: image %.3f, audio %.3f)", path, *accuracy)
        return Judges(image.eval(), audio.eval(), *accuracy)
    logger.info("training the judges (probes on real images and speech; cached for later evaluations)")
    common = dict(seed=seed, max_digits=data.max_digits, batch_size=JUDGE_BATCH)
    image, image_accuracy = probes.fit_image_probe(
        train_split, test_split, collate_fn, steps=image_steps, image_height=data.image_height, **common
    )
    audio, audio_accuracy = probes.fit_audio_probe(
        train_split, test_split, collate_fn, steps=audio_steps, num_mels=data.num_mels, **common
    )
    tensors = {f"image.{k}": v for k, v in image.state_dict().items()}
    tensors.update({f"audio.{k}": v for k, v in audio.state_dict().items()})
    tensors["accuracy"] = torch.tensor([image_accuracy, audio_accuracy], dtype=torch.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.replace(path)  # atomic: a killed evaluation never leaves half a file
    return Judges(image.eval(), audio.eval(), image_accuracy, audio_accuracy)


def vocoder_for(data: DataConfig) -> GriffinLimVocoder:
    """The Griffin-Lim vocoder inverting the log-mel that ``data``'s collator extracts."""
    return GriffinLimVocoder(sample_rate=data.sample_rate, n_fft=data.n_fft, hop_length=data.hop_length, num_mels=data.num_mels)


@dataclasses.dataclass
class Generated:
    """Samples made from a split's captions, with what was asked for."""

    captions: list[str]
    labels: Tensor  # (N,)
    images: Tensor | None = None  # (N, 1, H, W) in [-1, 1]
    waveforms: list[Tensor] = dataclasses.field(default_factory=list)  # (T_i,) each, cut after the speech


def _score(predicted: Tensor, labels: Tensor, heldout: frozenset[int]) -> dict[str, float]:
    right = predicted == labels
    is_heldout = torch.tensor([int(y) in heldout for y in labels.tolist()], dtype=torch.bool)
    out = {"probe_correct": float(right.float().mean()) if len(right) else 0.0, "count": int(len(right))}
    if is_heldout.any():
        out.update(heldout_probe_correct=float(right[is_heldout].float().mean()), heldout_count=int(is_heldout.sum()))
    return out


def _caption_batches(dataset: Dataset, collate_fn: Callable[..., Batch], batch_size: int, limit: int | None):
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        if Modality.TEXT not in batch.inputs:
            continue
        keep = batch.present[Modality.TEXT]
        if limit is not None:
            keep &= torch.arange(batch.size) < limit - seen
        if keep.any():
            yield batch.inputs[Modality.TEXT][keep], batch.masks[Modality.TEXT][keep], batch.labels[keep]
        seen += int(keep.sum())
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def text_to_image_figures(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[..., Batch],
    judge: probes.ImageProbe,
    decode: Callable[[list[int]], str],
    *,
    heldout_labels: frozenset[int] = frozenset(),
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> tuple[dict[str, float], Generated]:
    """Draw every caption's number (``Collator.source_texts``; the most likely codes) and let
    ``judge`` read it.

    Args:
        collate_fn: a ``Collator`` (its ``source_texts`` makes the model's input).

    Returns:
        ``{"probe_correct", "count", "heldout_probe_correct", "heldout_count"}`` and the samples.
    """
    was_training = model.training
    model.eval()
    images, labels, predicted, captions = [], [], [], []
    for ids, mask, batch_labels in _caption_batches(dataset, collate_fn, batch_size, limit):
        captions += [decode(row) for row in ids.tolist()]
        ids, mask = collate_fn.source_texts(Modality.IMAGE, captions[-len(ids) :])  # the digits to draw
        made = model.generate_image(ids.to(device), mask.to(device))  # (B, 1, H, W)
        predicted.append(probes.predict_numbers(judge, made).cpu())
        images.append(made.cpu())
        labels.append(batch_labels)
    model.train(was_training)
    labels_all = torch.cat(labels)
    figures = _score(torch.cat(predicted), labels_all, heldout_labels)
    return figures, Generated(captions, labels_all, images=torch.cat(images))


@torch.no_grad()
def reconstructed_probe_accuracy(
    tokenizer: nn.Module,
    judge: probes.ImageProbe,
    dataset: Dataset,
    collate_fn: Callable[..., Batch],
    *,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> float:
    """Share of real images whose number ``judge`` still reads after ``tokenizer.reconstruct``."""
    right = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        if Modality.IMAGE not in batch.inputs:
            continue
        keep = batch.present[Modality.IMAGE]
        images, labels = batch.inputs[Modality.IMAGE][keep], batch.labels[keep]
        if limit is not None:
            images, labels = images[: limit - total], labels[: limit - total]
        predicted = probes.predict_numbers(judge, tokenizer.reconstruct(images.to(device)).clamp(-1, 1)).cpu()
        right += int((predicted == labels).sum())
        total += len(labels)
        if limit is not None and total >= limit:
            break
    return right / max(total, 1)


@torch.no_grad()
def reference_round_trip_accuracy(
    tokenizer: nn.Module,
    judge: probes.ImageProbe,
    references: dict,
    *,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
) -> float:
    """Share of reference images (``references.reference_images``: label -> Reference) whose
    number ``judge`` still reads after ``tokenizer.reconstruct``: the ceiling of text -> image."""
    from polymodal.data.image import normalize_images

    labels = sorted(references)
    right = 0
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        pixels = torch.stack([torch.from_numpy(references[n].value) for n in chunk])[:, None].float() / 255.0
        images = tokenizer.reconstruct(normalize_images(pixels).to(device)).clamp(-1, 1)
        right += int((probes.predict_numbers(judge, images).cpu() == torch.tensor(chunk)).sum())
    return right / max(len(labels), 1)


def voiced_frames(log_mel: Tensor) -> Tensor:
    """(B, F, M) log-mel -> (B,) frames up to and including the last voiced one (at least 1)."""
    voiced = log_mel.amax(dim=-1) > VOICED_LEVEL  # (B, F)
    index = torch.arange(1, log_mel.shape[1] + 1, device=log_mel.device)  # (F,)
    return (voiced * index).amax(dim=1).clamp(min=1)


@torch.no_grad()
def text_to_audio_figures(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[..., Batch],
    judge: probes.AudioProbe,
    vocoder: GriffinLimVocoder,
    log_mel: Callable[[Tensor], Tensor],
    decode: Callable[[list[int]], str],
    *,
    heldout_labels: frozenset[int] = frozenset(),
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], Generated]:
    """Speak every caption's number (``Collator.source_texts``), vocode it, and let ``judge`` read
    the waveform's log-mel.

    Args:
        collate_fn: a ``Collator`` (its ``source_texts`` makes the model's input).
        log_mel: the collator's ``LogMel`` (waveforms (B, T) -> (B, F, M)).

    Returns:
        ``{"probe_correct", "count", "heldout_probe_correct", "heldout_count"}`` and the samples.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(seed)  # Griffin-Lim's start phases
    waveforms, labels, predicted, captions = [], [], [], []
    for ids, mask, batch_labels in _caption_batches(dataset, collate_fn, batch_size, limit):
        captions += [decode(row) for row in ids.tolist()]
        ids, mask = collate_fn.source_texts(Modality.AUDIO, captions[-len(ids) :])  # what they say aloud
        mels = model.generate_audio(ids.to(device), mask.to(device)).cpu()  # (B, F, M)
        frames = voiced_frames(mels)  # (B,)
        audio = vocoder(mels, generator=generator)  # (B, T)
        heard = log_mel(audio)[:, : mels.shape[1]]  # (B, F, M) what a listener's ear would extract
        heard_mask = torch.arange(heard.shape[1])[None, :] < frames[:, None]  # (B, F)
        predicted.append(probes.predict_numbers(judge, heard, heard_mask).cpu())
        samples = frames * vocoder.hop_length
        waveforms += [clip[: int(n)] for clip, n in zip(audio, samples)]
        labels.append(batch_labels)
    model.train(was_training)
    labels_all = torch.cat(labels)
    figures = _score(torch.cat(predicted), labels_all, heldout_labels)
    return figures, Generated(captions, labels_all, waveforms=waveforms)


def write_samples(folder: Path, images: Generated | None, speech: Generated | None, *, sample_rate: int, count: int = 8) -> list[Path]:
    """The first ``count`` samples into ``folder``: ``text_to_image.png`` (a grid, in caption order),
    ``text_to_audio_<i>.wav``, and ``captions.txt`` naming what each was made from."""
    from polymodal.decoders.vocoder import write_wav
    from polymodal.evaluation.reconstruction import image_grid, save_png

    folder.mkdir(parents=True, exist_ok=True)
    written, lines = [], []
    if images is not None and images.images is not None:
        written.append(save_png(image_grid(images.images[: 4 * count]), folder / "text_to_image.png"))
        lines += [f"text_to_image.png #{i}: {c}" for i, c in enumerate(images.captions[: 4 * count])]
    if speech is not None:
        for i, (clip, caption) in enumerate(zip(speech.waveforms[:count], speech.captions)):
            written.append(write_wav(folder / f"text_to_audio_{i}.wav", clip, sample_rate))
            lines.append(f"text_to_audio_{i}.wav: {caption}")
    if lines:
        (folder / "captions.txt").write_text("\n".join(lines) + "\n")
        written.append(folder / "captions.txt")
    return written
