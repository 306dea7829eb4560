"""Probe classifiers that read the number shown in an image or spoken in a clip: the judges of
generated images (text -> image) and generated speech (text -> audio).

A probe predicts a number of 1..S digits as digit slots rather than as one of 10^S classes, which a
small net trained on a few thousand items could not cover (the built-in data has 1000 numbers, some
of them never in training): a length head (S classes: 1..S digits) and S digit heads (10 classes
each), slot s holding the s-th digit of the numeral from the left; slots past the length are
ignored by the loss. Reading a number is greedy: the argmax length, then the argmax digit of each
of its slots, except that a number of two or more digits may not start with 0. These are the
length and per-position heads of Goodfellow et al. 2014, Multi-digit Number Recognition from Street
View Imagery using Deep Convolutional Neural Networks, arXiv:1312.6082.

``ImageProbe`` is a small CRNN (Shi et al. 2015, arXiv:1507.05717) on normalised (B, 1, 32, 96)
images: strided convolutions, then a bidirectional GRU over the columns. ``AudioProbe`` normalises
each clip's log-mel bands over its real frames (cepstral mean and variance normalisation),
subsamples time 4x with two strided 1-D convolutions and reads the frames with a bidirectional GRU
(Cho et al. 2014, arXiv:1406.1078); every stage is masked, so a clip scores the same whatever the
padding of its batch.

Which real data each probe learns from (the choice ``benchmarks/train_probes.py`` makes). The
issue asks for an image judge trained on real test-split images. In the built-in data the test
split's handwriting comes from its own pool of only 10% of the 5,000 MNIST digits (about 50 per
class), and a 20,000-sample build has 2,000 test items: a seeded 80/20 split of them gives a probe
1,600 training items, and its held-out fifth shares handwriting with them, so that figure would not
tell how the probe reads new handwriting (generated images are new handwriting). The recommended
set-up is therefore: train on train + val (18,000 items), report the accuracy on the whole test
split, whose handwriting and voices (drawn per utterance) the probe never saw; the judge stays
independent of whatever a generator learns from, as long as the generator's own figures are taken
on test prompts. Measured (seed 0, 1,200 image / 600 audio steps, one thread): image 91.8% on the
2,000 test items (the issue's 80/20 set-up: 82.0% on its 400, too few items to learn from), speech
97.7%. ``fit_image_probe`` and ``fit_audio_probe`` take any (train, eval) pair, so either set-up
is one call away (``split_dataset`` for the 80/20 one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, Dataset, Subset

from polymodal.data.batch import Batch, Sample
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

NUM_DIGIT_CLASSES = 10
IGNORE_INDEX = -100  # digit slots past a number's length: no loss (F.cross_entropy's default ignore)
WARMUP_FRACTION = 0.05  # of the training steps: linear warm-up, then cosine decay to 0
IMAGE_SHRINK = 8  # three stride-2 convolutions in ImageProbe
CMVN_EPS = 1e-5  # floor of a band's variance over a clip (a silent band would divide by 0)


# ----------------------------------------------------------------------------- digit slots


@dataclasses.dataclass(frozen=True)
class DigitSlotLogits:
    """What a probe outputs.

    Attributes:
        lengths: (B, S) logits; class k means a number of k + 1 digits.
        digits: (B, S, 10) logits of the digit in each slot, left to right.
    """

    lengths: Tensor
    digits: Tensor


def encode_digit_slots(numbers: Tensor, *, max_digits: int) -> tuple[Tensor, Tensor]:
    """Numbers -> length classes and left-aligned digit slots.

    Args:
        numbers: (B,) integers in 0..10^max_digits - 1.
        max_digits: S, the number of digit slots.

    Returns:
        (B,) long length classes (digits - 1), and (B, S) long digits with ``IGNORE_INDEX`` past the
        length, e.g. 42 -> 1, [4, 2, -100].

    Raises:
        ValueError: a number is negative or has more than ``max_digits`` digits.
    """
    numbers = numbers.long()
    if numbers.numel() and (int(numbers.min()) < 0 or int(numbers.max()) >= 10**max_digits):
        raise ValueError(
            f"numbers must be in 0..{10**max_digits - 1} for {max_digits} digit slots, got {numbers.tolist()}"
        )
    # Digit count: 1 for 0..9, 2 for 10..99, ...: one more for each power of ten the number reaches.
    powers = 10 ** torch.arange(1, max_digits, device=numbers.device)  # (S - 1,)
    num_digits = 1 + (numbers[:, None] >= powers).sum(1)  # (B,)
    slots = torch.arange(max_digits, device=numbers.device)  # (S,)
    # The digit in slot s (from the left) is the (num_digits - 1 - s)-th power of ten.
    exponent = (num_digits[:, None] - 1 - slots[None, :]).clamp(min=0)  # (B, S)
    digits = numbers[:, None] // 10**exponent % NUM_DIGIT_CLASSES  # (B, S)
    digits = digits.masked_fill(slots[None, :] >= num_digits[:, None], IGNORE_INDEX)
    return num_digits - 1, digits


def _number_table(max_digits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Every valid number's length class (N,) and one-hot digit slots (N, S, 10), zero past the length."""
    numbers = torch.arange(10**max_digits, device=device)  # (N,)
    lengths, digits = encode_digit_slots(numbers, max_digits=max_digits)
    one_hot = F.one_hot(digits.clamp(min=0), NUM_DIGIT_CLASSES).float()  # (N, S, 10)
    one_hot = one_hot * (digits >= 0)[:, :, None]
    return lengths, one_hot


def decode_digit_slots(logits: DigitSlotLogits) -> Tensor:
    """The number each item's heads read: (B,) long.

    The length is the length head's argmax; among the numbers of that length, the one whose digits
    score highest (summed log-probabilities over the real slots). That is the argmax digit of every
    slot, except that a number of two or more digits never starts with 0 (slot 0 then takes its
    best non-zero digit). Scores in float32 whatever the logits' dtype.
    """
    max_digits = logits.lengths.shape[1]
    table_lengths, one_hot = _number_table(max_digits, logits.lengths.device)  # (N,), (N, S, 10)
    digit_logp = logits.digits.float().log_softmax(-1)  # (B, S, 10)
    scores = torch.einsum("bsk,nsk->bn", digit_logp, one_hot)  # (B, N)
    lengths = logits.lengths.argmax(-1)  # (B,)
    scores = scores.masked_fill(table_lengths[None, :] != lengths[:, None], -torch.inf)
    return scores.argmax(-1)


def digit_slot_loss(logits: DigitSlotLogits, numbers: Tensor) -> Tensor:
    """Cross-entropy of the length plus the mean cross-entropy over the real digit slots. () scalar.

    Args:
        logits: the probe's output for B items.
        numbers: (B,) the true numbers.
    """
    lengths, digits = encode_digit_slots(numbers, max_digits=logits.lengths.shape[1])
    length_loss = F.cross_entropy(logits.lengths.float(), lengths)
    digit_loss = F.cross_entropy(
        logits.digits.float().flatten(0, 1), digits.flatten(), ignore_index=IGNORE_INDEX
    )  # (B * S, 10) vs (B * S,)
    return length_loss + digit_loss


class DigitSlotHead(nn.Module):
    """Features (B, dim_in) -> ``DigitSlotLogits`` with S length classes and S x 10 digit logits."""

    def __init__(self, dim_in: int, *, max_digits: int) -> None:
        super().__init__()
        self.max_digits = max_digits
        self.lengths = nn.Linear(dim_in, max_digits)
        self.digits = nn.Linear(dim_in, max_digits * NUM_DIGIT_CLASSES)

    def forward(self, features: Tensor) -> DigitSlotLogits:
        digits = self.digits(features).unflatten(-1, (self.max_digits, NUM_DIGIT_CLASSES))  # (B, S, 10)
        return DigitSlotLogits(self.lengths(features), digits)


# ----------------------------------------------------------------------------- probes


class ImageProbe(nn.Module):
    """Normalised images (B, 1, H, W) -> ``DigitSlotLogits``.

    Four conv-BN-ReLU layers, three of stride 2 (digits are 19..29 pixels tall, still legible at
    half resolution: 32 x 96 -> 4 x 12); the columns of the last map are read left
    to right by a bidirectional GRU (a CRNN: Shi et al. 2015, arXiv:1507.05717), whose two final
    states feed the heads. The GRU counts the digits and knows which comes first wherever the row
    of digits starts.

    Args:
        image_height: H, a multiple of 8; any width works.
        channels: widths of the stride-2 stem, the two middle layers and the last layer.
        dim_hidden: GRU width per direction.
        dropout: before the heads.
        jitter: training-time random scale (1 +- jitter) and shift (up to jitter x H pixels); off by
            default, since in one measurement (1,200 steps on 18,000 images) 0.1 lowered the held-out
            accuracy from 92.8% to 91.4%.
        max_digits: S, the digit slots.
    """

    modality = Modality.IMAGE

    def __init__(
        self,
        *,
        image_height: int = 32,
        channels: tuple[int, int, int] = (16, 32, 64),
        dim_hidden: int = 64,
        dropout: float = 0.2,
        jitter: float = 0.0,
        max_digits: int = 3,
    ) -> None:
        super().__init__()
        self.jitter = jitter

        def conv(dim_in: int, dim_out: int, stride: int) -> list[nn.Module]:
            conv2d = nn.Conv2d(dim_in, dim_out, 3, stride=stride, padding=1, bias=False)
            return [conv2d, nn.BatchNorm2d(dim_out), nn.ReLU()]

        # Strided convolutions rather than conv + max pooling: on a CPU the full-resolution maps
        # dominate the cost, and a stride-2 conv never builds them.
        dim_stem, dim_mid, dim_out = channels
        self.convs = nn.Sequential(
            *conv(1, dim_stem, 2),  # (B, C1, H / 2, W / 2)
            *conv(dim_stem, dim_mid, 2),  # (B, C2, H / 4, W / 4)
            *conv(dim_mid, dim_mid, 1),
            *conv(dim_mid, dim_out, 2),  # (B, C3, H / 8, W / 8)
        )
        self.shrink = IMAGE_SHRINK
        if image_height % self.shrink:
            raise ValueError(f"image_height must divide by {self.shrink}, got {image_height}")
        dim_column = dim_out * (image_height // self.shrink)  # features of one column of the last map
        self.gru = nn.GRU(dim_column, dim_hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = DigitSlotHead(2 * dim_hidden, max_digits=max_digits)

    def _jittered(self, images: Tensor) -> Tensor:
        """Training-time augmentation: each image scaled by 1 +- jitter and shifted by up to
        jitter x its height, so the probe does not fit the exact layouts of its training images."""
        batch = images.shape[0]
        draws = torch.rand(batch, 3, device=images.device) * 2 - 1  # (B, 3) in [-1, 1)
        scale = 1 + self.jitter * draws[:, 0]  # (B,)
        height, width = images.shape[-2:]
        theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)  # output -> input coordinates
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, 0, 2] = 2 * self.jitter * draws[:, 1] * height / width  # shifts in [-1, 1] grid units
        theta[:, 1, 2] = 2 * self.jitter * draws[:, 2]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Sampled in [0, 1], where zero padding is the black background, then back to [-1, 1].
        return F.grid_sample((images + 1) / 2, grid, align_corners=False) * 2 - 1

    def forward(self, images: Tensor) -> DigitSlotLogits:
        if self.training and self.jitter > 0:
            images = self._jittered(images)
        features = self.convs(images)  # (B, 1, H, W) -> (B, C', H', W')
        columns = rearrange(features, "b c h w -> b w (c h)")  # (B, W', C' * H'), left to right
        _, last = self.gru(columns)  # (2, B, dim_hidden): forward state after the right edge, backward after the left
        return self.head(self.dropout(torch.cat([last[0], last[1]], dim=-1)))  # (B, 2 * dim_hidden) -> heads


class AudioProbe(nn.Module):
    """Log-mel frames (B, F, num_mels) with frame mask (B, F) -> ``DigitSlotLogits``.

    Args:
        num_mels: the collator's mel bands.
        dim: conv width.
        num_convs: stride-2 convolutions (2^num_convs fewer frames).
        dim_hidden: GRU width per direction.
        dropout: before the heads.
        max_digits: S, the digit slots.
    """

    modality = Modality.AUDIO

    def __init__(
        self,
        *,
        num_mels: int = 64,
        dim: int = 128,
        num_convs: int = 2,
        dim_hidden: int = 96,
        dropout: float = 0.2,
        max_digits: int = 3,
    ) -> None:
        super().__init__()
        # Stride-2 convolutions: 2^num_convs fewer frames for the GRU. At 10 ms per frame and 4x,
        # a GRU step covers 40 ms; a spoken digit word lasts about 200 ms or more.
        self.convs = nn.ModuleList(
            nn.Conv1d(num_mels if i == 0 else dim, dim, 5, stride=2, padding=2) for i in range(num_convs)
        )
        self.gru = nn.GRU(dim, dim_hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = DigitSlotHead(2 * dim_hidden, max_digits=max_digits)

    @staticmethod
    def _normalise(mels: Tensor, mask: Tensor) -> Tensor:
        """Per clip and band: zero mean, unit variance over the real frames; padding stays 0."""
        weights = mask[:, :, None].to(mels.dtype)  # (B, F, 1)
        count = weights.sum(1, keepdim=True).clamp(min=1)  # (B, 1, 1)
        mean = (mels * weights).sum(1, keepdim=True) / count  # (B, 1, num_mels)
        var = ((mels - mean) ** 2 * weights).sum(1, keepdim=True) / count
        return (mels - mean) * torch.rsqrt(var + CMVN_EPS) * weights

    def forward(self, mels: Tensor, mask: Tensor) -> DigitSlotLogits:
        lengths = mask.sum(1)  # (B,)
        x = self._normalise(mels, mask).transpose(1, 2)  # (B, num_mels, F)
        for conv in self.convs:
            x = F.gelu(conv(x))  # (B, dim, F') -> (B, dim, ceil(F' / 2))
            # A stride-2 conv (k=5, p=2) maps L real frames to ceil(L / 2); zero the frames past
            # them, so the next layer reads zeros there whatever the batch's padding.
            lengths = (lengths + 1) // 2
            keep = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]  # (B, F')
            x = x * keep[:, None, :].to(x.dtype)
        packed = pack_padded_sequence(
            x.transpose(1, 2), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )  # (B, F', dim) without the padding
        _, last = self.gru(packed)  # (2, B, dim_hidden): forward state at each clip's end, backward at its start
        features = torch.cat([last[0], last[1]], dim=-1)  # (B, 2 * dim_hidden)
        return self.head(self.dropout(features))


def _probe_inputs(probe: nn.Module, batch: Batch) -> tuple[tuple[Tensor, ...], Tensor]:
    """The probe's inputs from a batch, keeping only the items that carry its modality; and their labels."""
    modality = probe.modality
    if modality not in batch.inputs:
        return (), batch.labels[:0]
    keep = batch.present[modality]  # (B,)
    if modality == Modality.AUDIO:
        return (batch.inputs[modality][keep], batch.masks[modality][keep]), batch.labels[keep]
    return (batch.inputs[modality][keep],), batch.labels[keep]


# ----------------------------------------------------------------------------- training, scoring


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
        probe: an ``ImageProbe`` or ``AudioProbe`` (anything with ``modality`` returning
            ``DigitSlotLogits``).
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

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
            inputs, labels = _probe_inputs(probe, next(batches))
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
    """The numbers a probe reads: (B,) long. Inputs as the probe's ``forward`` takes them."""
    was_training = probe.training
    probe.eval()
    numbers = decode_digit_slots(probe(*inputs))
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
        inputs, labels = _probe_inputs(probe, batch)
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


# ----------------------------------------------------------------------------- fitting


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
