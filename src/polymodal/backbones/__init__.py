"""Backbones: the shared sequence model over all modalities' tokens. One registry, ``BACKBONES``."""

from polymodal.registry import Registry

BACKBONES: Registry = Registry("backbone")

from polymodal.backbones import transformer  # noqa: E402  (registers "transformer")
from polymodal.backbones import hf_causal_lm  # noqa: E402,F401  (registers "hf_causal_lm"; imports transformers lazily)
from polymodal.backbones.transformer import BackboneIntermediates, TransformerBackbone  # noqa: E402

__all__ = ["BACKBONES", "BackboneIntermediates", "TransformerBackbone", "transformer"]
