"""Training and scoring the built-in data's probe classifiers (``probes.py``) on real data: AdamW
with a linear warm-up and cosine decay (``training.optim.lr_factor``) on the digit-slot loss.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from polymodal.data.batch import Batch, Sample
from polymodal.datasets.spoken_numbers.digit_slots import decode_digit_slots, digit_slot_loss
from polymodal.datasets.spoken_numbers.probes import AudioProbe, ImageProbe, probe_inputs
from polymodal.modality import Modality
from polymodal.training.optim import lr_factor

logger = logging.getLogger(__name__)

WARMUP_FRACTION = 0.05  # of the training steps: linear warm-up, then cosine decay to 0


class _OnlyModality:
    """A collate function that drops every other modality from the samples first (a picklable
    wrapper), so an image probe's batches spend no time on log-mels or tokenising captions."""

    def __init__(self, collate_fn: Callable[..., Batch], modality: Modality) -> None:
        self.collate_fn = collate_fn
        self.field = modality.value  # Sample's attribute of that modality: image | text | audio

    def __call__(self, samples: list[Sample | None]) -> Batch:
        cleared = {m.value: None for m in Modality if m.value != self.field}
        return self.collate_fn([None if s is None else dataclasses.replace(s, **cleared) for s in samples])



def split_dataset(dataset: Dataset, *, holdout_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A seeded random split into (kept, held out); ``holdout_fraction`` of the items are held out."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    num_held = max(1, round(len(dataset) * holdout_fraction))
    return Subset(dataset, order[num_held:]), Subset(dataset, order[:num_held])


def _batches_forever(loader: DataLoader) -> Iterator[Batch]:
    while True:
        yield from loader


def train_probe(
    probe: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[..., Batch],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train a probe with AdamW (linear warm-up, cosine decay) on the digit-slot loss, in place.

    Batches are drawn reshuffled each epoch by a generator seeded with ``seed``; dropout draws come
    from a forked RNG seeded likewise, so the caller's global RNG is left as it was.

    Args:
        probe: an ``ImageProbe`` or ``AudioProbe`` (a ``modality``, returning ``DigitSlotLogits``).
        dataset: ``Sample``s whose labels are the numbers; items without the probe's modality are skipped.
        collate_fn: e.g. the run's ``Collator``.
        steps: optimiser steps.
        batch_size: items per step.
        lr: peak learning rate.
        weight_decay: AdamW's decoupled decay.
        seed: shuffling and dropout.
        device: where to train; the probe is moved there.

    Returns:
        the probe, trained, in eval mode.
    """
    probe.to(device).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(steps * WARMUP_FRACTION))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps=warmup, total_steps=steps, min_lr_ratio=0.0)
    )
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=True,
        drop_last=True,
        collate_fn=_OnlyModality(collate_fn, probe.modality),
        generator=torch.Generator().manual_seed(seed),
    )
    batches = _batches_forever(loader)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            inputs, labels = probe_inputs(probe, next(batches))
            if labels.numel() == 0:
                continue
            loss = digit_slot_loss(probe(*(x.to(device) for x in inputs)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                logger.info("probe %s step %d/%d loss %.4f", probe.modality, step + 1, steps, loss.item())
    return probe.eval()


@torch.no_grad()
def predict_numbers(probe: nn.Module, *inputs: Tensor) -> Tensor:
    """The numbers a probe reads: (B,) long, on the probe's device. Inputs as the probe's
    ``forward`` takes them, from any device (a model's samples on a GPU, a judge on the CPU)."""
    was_training = probe.training
    probe.eval()
    where = next(probe.parameters()).device
    numbers = decode_digit_slots(probe(*(x.to(where) for x in inputs)))
    probe.train(was_training)
    return numbers


def probe_accuracy(
    probe: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[..., Batch],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Share of the dataset's items (those carrying the probe's modality) whose number the probe reads right."""
    collate = _OnlyModality(collate_fn, probe.modality)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    correct, count = 0, 0
    for batch in loader:
        inputs, labels = probe_inputs(probe, batch)
        if labels.numel() == 0:
            continue
        predicted = predict_numbers(probe, *(x.to(device) for x in inputs))
        correct += int((predicted.cpu() == labels).sum())
        count += int(labels.numel())
    if count == 0:
        raise ValueError(f"the dataset has no {probe.modality} items to score")
    return correct / count


def judge_images(probe: ImageProbe, images: Tensor, labels: Tensor) -> float:
    """Share of images showing their intended number, as read by ``probe``.

    Args:
        probe: a trained ``ImageProbe``.
        images: (B, 1, H, W) normalised to [-1, 1] like the collator's (generated images as they are).
        labels: (B,) the intended numbers.
    """
    predicted = predict_numbers(probe, images)
    return int((predicted.cpu() == labels.cpu()).sum()) / labels.numel()


def judge_audio(probe: AudioProbe, log_mels: Tensor, mask: Tensor, labels: Tensor) -> float:
    """Share of clips speaking their intended number, as read by ``probe``.

    Args:
        probe: a trained ``AudioProbe``.
        log_mels: (B, F, num_mels) log-mel frames as the collator makes them (natural log of power).
        mask: (B, F) True on real frames.
        labels: (B,) the intended numbers.
    """
    predicted = predict_numbers(probe, log_mels, mask)
    return int((predicted.cpu() == labels.cpu()).sum()) / labels.numel()


def _fit(
    make_probe: Callable[[], nn.Module],
    train_split: Dataset,
    eval_split: Dataset,
    collate_fn: Callable[..., Batch],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str,
) -> tuple[nn.Module, float]:
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation, the caller's RNG untouched
        torch.manual_seed(seed)
        probe = make_probe()
    train_probe(probe, train_split, collate_fn, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    accuracy = probe_accuracy(probe, eval_split, collate_fn, device=device)
    logger.info("%s probe: accuracy %.4f on %d held-out real items", probe.modality, accuracy, len(eval_split))
    return probe, accuracy


def fit_image_probe(
    train_split: Dataset,
    eval_split: Dataset,
    collate_fn: Callable[..., Batch],
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    image_height: int = 32,
    max_digits: int = 3,
    device: torch.device | str = "cpu",
) -> tuple[ImageProbe, float]:
    """Train an ``ImageProbe`` on ``train_split``'s real images; score it on ``eval_split``'s.

    Returns:
        the trained probe (eval mode) and its accuracy on ``eval_split`` (share of numbers read right).
    """
    make = lambda: ImageProbe(image_height=image_height, max_digits=max_digits)  # noqa: E731
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    return _fit(make, train_split, eval_split, collate_fn, **settings)


def fit_audio_probe(
    train_split: Dataset,
    eval_split: Dataset,
    collate_fn: Callable[..., Batch],
    *,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    num_mels: int = 64,
    max_digits: int = 3,
    device: torch.device | str = "cpu",
) -> tuple[AudioProbe, float]:
    """Train an ``AudioProbe`` on ``train_split``'s real speech; score it on ``eval_split``'s.

    Returns:
        the trained probe (eval mode) and its accuracy on ``eval_split`` (share of numbers read right).
    """
    make = lambda: AudioProbe(num_mels=num_mels, max_digits=max_digits)  # noqa: E731
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device)
    return _fit(make, train_split, eval_split, collate_fn, **settings)
