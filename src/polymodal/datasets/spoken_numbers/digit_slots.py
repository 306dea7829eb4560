"""Numbers as digit slots: what the built-in data's probe classifiers (``probes.py``) predict.

A probe predicts a number of 1..S digits as digit slots rather than as one of 10^S classes, which a
small net trained on a few thousand items could not cover (the built-in data has 1000 numbers, some
of them never in training): a length head (S classes: 1..S digits) and S digit heads (10 classes
each), slot s holding the s-th digit of the numeral from the left; slots past the length are
ignored by the loss. Reading a number is greedy: the argmax length, then the argmax digit of each
of its slots, except that a number of two or more digits may not start with 0. These are the
length and per-position heads of Goodfellow et al. 2014, Multi-digit Number Recognition from Street
View Imagery using Deep Convolutional Neural Networks, arXiv:1312.6082.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_DIGIT_CLASSES = 10
IGNORE_INDEX = -100  # digit slots past a number's length: no loss (F.cross_entropy's default ignore)


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
