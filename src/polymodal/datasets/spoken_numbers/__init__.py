"""The built-in dataset, spoken handwritten numbers, as a plug-in (``source.py`` registers it)."""

from polymodal.datasets.spoken_numbers import source  # noqa: F401  (registers "spoken_numbers")
