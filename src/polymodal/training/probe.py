"""The probe batch of the live diagnostics: its settings (``train.diagnostics``), which validation
items it holds, and measuring it without touching training's random streams.

Kept apart from ``diagnostics/live.py`` (the measurement) so the config can check the settings
without importing the measures and their scipy dependency.

The probe is a fixed set of validation items, drawn once by a generator seeded from the run's seed:
the same items at every measurement and after a resume, so a change in a curve is a change in the
model, never in the data. Everything a measurement does runs inside ``preserved_rng``: the Python,
numpy, torch CPU and CUDA generators are put back afterwards, so a run measured every step trains
bitwise like one never measured (dropout, shuffling and sampling draw the same numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from polymodal.errors import ConfigError
from polymodal.modality import Modality

# The probe's generator seed is the run's seed plus this, so it draws apart from the training order.
PROBE_SEED_OFFSET = 7919
# Unbiased HSIC, behind the probe's CKA, needs at least 4 items.
MIN_PROBE_ITEMS = 4
# Cosines of gradients need at least two items for a loss over pairs (the contrastive terms).
MIN_CONFLICT_ITEMS = 2


@dataclasses.dataclass(frozen=True)
class DiagnosticsSettings:
    """``train.diagnostics``: how often and on how many validation items the model is measured.

    Attributes:
        every: measure at every ``every``-th optimiser step and at the last; 0 turns it off.
        items: probe items for the representation measures (cross-modal CKA per layer, effective
            rank, leakage, expert usage).
        conflict_items: the first this many probe items go through the model's loss for the
            gradient-conflict matrix (one backward per loss term, so it is kept small).
    """

    every: int = 0
    items: int = 256
    conflict_items: int = 32

    @property
    def enabled(self) -> bool:
        return self.every > 0


def diagnostics_settings(settings: Mapping[str, Any], where: str = "train.diagnostics") -> DiagnosticsSettings:
    """Check a ``train.diagnostics`` mapping and return its settings.

    Raises:
        ConfigError: naming the bad key (``train.diagnostics.items: ...``) and what is valid.
    """
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {{every: 100, items: 256}}, got {settings!r}")
    valid = [f.name for f in dataclasses.fields(DiagnosticsSettings)]
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown setting; valid: {', '.join(valid)}")
    lowest = {"every": 0, "items": MIN_PROBE_ITEMS, "conflict_items": MIN_CONFLICT_ITEMS}
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest[key]:
            raise ConfigError(f"{where}.{key}: expected an integer >= {lowest[key]}, got {value!r}")
    parsed = DiagnosticsSettings(**settings)
    if parsed.conflict_items > parsed.items:
        raise ConfigError(f"{where}.conflict_items: {parsed.conflict_items} exceeds items {parsed.items}; lower it")
    return parsed


def probe_indices(dataset: Sequence[Any], modalities: Sequence[Modality], *, items: int, seed: int) -> list[int]:
    """Up to ``items`` indices of ``dataset`` items that carry every one of ``modalities``, drawn
    in a seeded random order (the same for the same seed and dataset).

    Args:
        dataset: items as ``polymodal.data.batch.Sample`` (None for one that failed to load).
        modalities: the modalities the model encodes; an item lacking one is passed over, since
            the cross-modal measures compare the same items' states in every modality.
        items: how many to take at most.
        seed: the run's seed.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET))
    chosen: list[int] = []
    for index in order.tolist():
        sample = dataset[index]
        if sample is not None and all(getattr(sample, m.value, None) is not None for m in modalities):
            chosen.append(index)
            if len(chosen) == items:
                break
    return chosen


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body, then put back the Python, numpy, torch CPU and (initialised) CUDA generators."""
    python_state, numpy_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
