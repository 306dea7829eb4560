"""``train.feature_cache``: the features of fully frozen encoders computed once per training item.

A frozen pretrained encoder (``hf_image`` or ``hf_audio`` with ``freeze: frozen``) is a fixed
function of its input, so training need not run it again on an item it has seen: its output is
cached per item (``encoders.feature_cache.FeatureCache``), keyed by the training set's identity
(the data settings that decide what the items are), the item's index and the encoder's identity.
``memory`` keeps the features for this run; a folder keeps them on disk for later runs too.
Evaluation never reads the cache (its items are not training items).

An augmented modality's input differs every epoch, so its features cannot be cached: asking for
both is a config error, not a silent miss.
"""

from __future__ import annotations

import json
import logging

from torch import nn

from polymodal.config import Config, to_dict
from polymodal.encoders.feature_cache import FeatureCache
from polymodal.errors import ConfigError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

MEMORY = "memory"
OFF = "off"


def training_set_identity(config: Config) -> str:
    """What decides the training items: the data settings (augmentation aside) and the seed."""
    data = {k: v for k, v in to_dict(config.data).items() if k not in ("augment", "num_workers")}
    return json.dumps({"data": data, "seed": config.seed, "split": "train"}, sort_keys=True)


def _augmented(config: Config, modality: Modality) -> bool:
    augment = config.data.augment
    if modality is Modality.AUDIO:
        return augment.audio.active or augment.audio.spec_augment_p > 0 or augment.audio.vtlp_p > 0
    return modality is Modality.IMAGE and augment.image.active


def attach_feature_caches(model: nn.Module, config: Config) -> list[Modality]:
    """Give every fully frozen encoder of ``model`` a feature cache, as ``train.feature_cache`` says.

    Returns:
        the modalities now cached ([] when the setting is ``off``).

    Raises:
        ConfigError: the setting is on but no encoder is fully frozen, or a cached modality is augmented.
    """
    setting = config.train.feature_cache
    if setting == OFF:
        return []
    inputs = getattr(model, "inputs", None)
    frozen = {}
    for modality in getattr(inputs, "modalities", []):
        encoder = inputs.encoders[modality.value]
        if hasattr(encoder, "cache_identity") and not any(p.requires_grad for p in encoder.parameters()):
            frozen[modality] = encoder
    if not frozen:
        raise ConfigError(
            "train.feature_cache: no encoder of this model is fully frozen with a cache identity "
            "(hf_image / hf_audio with freeze: frozen); set train.feature_cache=off"
        )
    for modality, encoder in frozen.items():
        if _augmented(config, modality):
            raise ConfigError(
                f"train.feature_cache: the {modality} inputs are augmented (data.augment.{modality}), so their "
                "features differ every epoch; turn one of the two off"
            )
        folder = None if setting == MEMORY else setting
        inputs.caches[modality] = FeatureCache(encoder, dataset=training_set_identity(config), folder=folder)
        logger.info("caching the frozen %s encoder's features (%s)", modality, setting)
    return list(frozen)
