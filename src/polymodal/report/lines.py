"""The lines a run's test figures are held against, per shipped preset.

A line is a lower bound on one figure of ``eval.json`` (flat key, ``image_to_text/exact``). The
``default`` preset's are the main job's (README, "The main job"; issue 4): image -> text exact
match >= 85%, audio -> text >= 90%, image <-> text retrieval R@1 >= 70% both ways, text -> image
(the judge reads the asked number) >= 70%, text -> audio (likewise) >= 60%. The other presets
(``tiny`` trains for seconds, ``clip`` and ``vqvae`` have no stated line) have none, so their
reports list the figures without a verdict. A new preset with a promise adds its entry here.

Which preset a run is: the one whose resolved ``model`` section and ``data.source`` the run's
``config.yaml`` repeats exactly (a run with fewer steps, another seed or run_dir still counts; one
with another model does not). ``polymodal report --lines PRESET`` names it instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Line:
    """A figure's lower bound: ``figure`` (flat ``eval.json`` key) must reach ``at_least``."""

    label: str
    figure: str
    at_least: float

    def met(self, figures: Mapping[str, float]) -> bool | None:
        """True or False, or None when the run has no such figure."""
        value = figures.get(self.figure)
        return None if value is None else value >= self.at_least


LINES: dict[str, tuple[Line, ...]] = {
    "default": (
        Line("image -> text exact match", "image_to_text/exact", 0.85),
        Line("audio -> text exact match", "audio_to_text/exact", 0.90),
        Line("image -> text retrieval R@1", "retrieval_image_to_text/R@1", 0.70),
        Line("text -> image retrieval R@1", "retrieval_text_to_image/R@1", 0.70),
        Line("text -> image: the judge reads the asked number", "text_to_image/probe_correct", 0.70),
        Line("text -> audio: the judge reads the asked number", "text_to_audio/probe_correct", 0.60),
    ),
}


def lines_for(preset: str | None) -> tuple[Line, ...]:
    return LINES.get(preset or "", ())


def preset_of(config: Mapping[str, Any]) -> str | None:
    """The shipped preset a run's resolved config (``config.yaml`` as read) was made from, or None."""
    model, source = config.get("model"), config.get("data", {}).get("source")
    for name, (preset_model, preset_source) in _preset_signatures().items():
        if model == preset_model and source == preset_source:
            return name
    return None


@functools.cache
def _preset_signatures() -> dict[str, tuple[Any, Any]]:
    """Each preset's resolved ``model`` section and data source, as ``config.yaml`` would hold them."""
    import yaml

    from polymodal.config import load_config, preset_names, to_dict

    signatures = {}
    for name in preset_names():
        # Through YAML, as config.yaml was written, so tuples compare as the lists read back.
        # A manifest preset needs a manifest to load; which one does not change its signature.
        resolved = yaml.safe_load(yaml.safe_dump(to_dict(load_config([name], ["data.manifest=any.jsonl"])), sort_keys=False))
        signatures[name] = (resolved["model"], resolved["data"]["source"])
    return signatures
