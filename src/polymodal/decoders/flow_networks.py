"""The velocity networks a flow image head may use, by name: ``decoder: {name: dit | unet, ...}``.

Both take the same wiring ``(dim_in, layout, dim_context)``, a (rows, cols) grid of patch tokens of
``dim_in`` values and the condition tokens' width, and the same call ``network(tokens (B, N,
dim_in), t (B,), context=(B, Nc, dim_context), context_mask=(B, Nc) or None) -> (B, N, dim_in)``
(the mask True on real condition tokens, padded ones never read), so the heads, their condition
dropout and the samplers do not depend on which. The DiT stays the default (a ``decoder`` mapping
without ``name``), so existing configs and checkpoints read as before.

References: Peebles and Xie 2022, DiT, arXiv:2212.09748 (``decoders/dit.py``); Ho et al. 2020,
DDPM, arXiv:2006.11239 (``decoders/unet.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from polymodal.decoders.dit import FlowTransformer
from polymodal.decoders.unet import FlowUNet
from polymodal.registry import Registry

FLOW_NETWORKS: Registry = Registry("flow decoder")
FLOW_NETWORKS.add("dit", FlowTransformer)
FLOW_NETWORKS.add("unet", FlowUNet)
DEFAULT_NETWORK = "dit"


def network_spec(decoder: Mapping[str, Any]) -> dict[str, Any]:
    """A head's ``decoder`` mapping as a registry spec: the DiT where it names no network."""
    return {"name": DEFAULT_NETWORK, **decoder}
