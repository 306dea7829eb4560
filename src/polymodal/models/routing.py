"""Which modality each token of the backbone's calls belongs to, for a backbone that routes tokens
by modality (the modality-aware mixture of experts, ``layers/moe.py``), and the collector of its
auxiliary losses over a training step.

A model says what it is about to run (``with routing.of(source, target):``, around a task's head
or a modality's source pass); the backbone calls then carry per-token modality ids: the source's
row of ``MODALITY_INDEX`` on the source positions, the target's on the target positions. A
backbone without a mixture of experts gets nothing extra, so any backbone works unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from polymodal.layers.moe import MoEAux
from polymodal.modality import MODALITY_INDEX, Modality

NO_MODALITY = -1  # a token of no known modality: a mixture of experts routes it to shared experts


class ModalityRouting:
    """Per-token modality ids for the backbone's calls, and a per-step ``MoEAux``.

    Args:
        backbone: routes by modality when it has a mixture of experts (``moe_layers`` not empty).
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.enabled = bool(getattr(backbone, "moe_layers", None))
        self.source: Modality | None = None
        self.target: Modality | None = None
        self.aux: MoEAux | None = None

    @contextlib.contextmanager
    def of(self, source: Modality | None, target: Modality | None = None) -> Iterator[None]:
        """The backbone calls inside read ``source`` tokens first, then ``target`` tokens."""
        previous = self.source, self.target
        self.source, self.target = source, target
        try:
            yield
        finally:
            self.source, self.target = previous

    def start_step(self) -> None:
        """A fresh collector of the mixture of experts' losses and counts."""
        self.aux = MoEAux() if self.enabled else None

    def finish_step(self) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The step's mixture-of-experts losses and stats (nothing without one)."""
        aux, self.aux = self.aux, None
        return (aux.losses(), aux.stats()) if aux is not None else ({}, {})

    def options(self, batch: int, num_source: int, num_target: int = 0, *, device: torch.device) -> dict:
        """The extra backbone arguments for a call over ``num_source`` then ``num_target`` tokens."""
        if not self.enabled:
            return {}
        ids = torch.full((batch, num_source + num_target), NO_MODALITY, dtype=torch.long, device=device)  # (B, N)
        if self.source is not None:
            ids[:, :num_source] = MODALITY_INDEX[self.source]
        if self.target is not None and num_target:
            ids[:, num_source:] = MODALITY_INDEX[self.target]
        return {"modality_ids": ids, "aux": self.aux}

    def target_options(self, tokens: Tensor) -> dict:
        """The extra arguments for a call over target tokens alone (a cached generation step)."""
        if not self.enabled:
            return {}
        with self.of(self.target):
            return self.options(tokens.shape[0], tokens.shape[1], device=tokens.device)
