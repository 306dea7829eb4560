"""Every part of a config checked through its registry, once, before any data or weights exist.

``config.validate`` checks the tree's values, then calls ``check_parts``: the dataset plug-in is
built with its options (cheap: it reads nothing), the model is built on the meta device (every part
spec meets its registry's signature, every constructor's own checks run, nothing is allocated),
and the two are checked against each other (a head that learns from aligned references needs a
dataset that has them). Any failure is a ConfigError naming the key and the valid choices.
"""

from __future__ import annotations

from polymodal.config import Config
from polymodal.errors import ConfigError


def check_parts(config: Config) -> None:
    from polymodal.datasets import DATASETS
    from polymodal.datasets.base import build_source
    from polymodal.models.architectures import check_model

    if config.data.source not in DATASETS:
        raise ConfigError(f"data.source: {config.data.source!r} is not valid; valid: {', '.join(DATASETS.names())}")
    check_speaker_norm(config)
    provided = {m.value for m in type(build_source(config.data, config.seed)).references_for}
    heads = getattr(check_model(config), "heads", {})
    missing = [key for key, head in heads.items() if getattr(head, "reads_references", False) and key not in provided]
    if missing:
        from polymodal.heads import HEADS

        target = heads[missing[0]].target
        own = [n for n in HEADS.names() if HEADS.get(n).target is target and not HEADS.get(n).reads_references]
        raise ConfigError(
            f"model.heads.{missing[0]}: the {heads[missing[0]].registry_name} head learns from aligned references, "
            f"which data.source={config.data.source} does not have; pick a head that learns from the items "
            f"(model.heads.{missing[0]}={{name: {own[0] if own else '...'}}}; valid: {', '.join(own) or 'none'}) or drop the task"
        )


def check_speaker_norm(config: Config) -> None:
    """``data.speaker_norm`` normalises log-mel frames by speaker: the audio encoder must read
    log-mel frames and must not normalise each clip again (``input_norm``)."""
    from polymodal.training.run import audio_input

    audio = config.model.encoders.get("audio")
    if not config.data.speaker_norm or audio is None:
        return
    if audio_input(config) != "log_mel":
        raise ConfigError(
            f"data.speaker_norm normalises log-mel frames, but model.encoders.audio={audio['name']} reads waveforms; "
            "set data.speaker_norm=false, or pick an encoder that reads log-mel (audio_conv)"
        )
    if audio.get("input_norm"):
        raise ConfigError(
            "data.speaker_norm normalises each speaker's clips, and model.encoders.audio.input_norm=true would "
            "normalise each clip again on top; set model.encoders.audio.input_norm=false"
        )
