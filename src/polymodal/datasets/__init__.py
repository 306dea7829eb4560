"""Datasets as plug-ins: where a run's samples come from, and everything a dataset alone knows.

Registered in ``DATASETS`` and named by ``data.source``; built with wiring ``(data, seed)`` (the
``DataConfig`` and the run's seed) and the keyword-only settings in ``data.options``. Building is
cheap: nothing is read or made until ``load()``, so a trained run can be loaded for generation
without its data. ``base.DataSource`` lists what a plug-in provides: its splits, how a caption
names a label, what a generator reads for a text, aligned references, prompts for zero-shot
classification, and its own evaluators of generated samples. The generic model, collator,
evaluation and training reach a dataset only through that interface.
"""

from polymodal.registry import Registry

DATASETS: Registry = Registry("dataset")

from polymodal.datasets import manifest, spoken_numbers  # noqa: E402,F401  (register the plug-ins)
from polymodal.datasets.base import DataSource, Splits, build_source  # noqa: E402

__all__ = ["DATASETS", "DataSource", "Splits", "build_source"]
