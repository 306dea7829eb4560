"""The trunk of a pretrained Hugging Face encoder: cut it at a chosen layer, drop what the tokens
never pass through, and freeze it by policy. Shared by ``hf_image`` and ``hf_audio``.

Cutting at layer k keeps the first k transformer blocks and nothing after them: the final norm
(if the model has one after its blocks) is replaced by an identity, so the trunk's
``last_hidden_state`` is the raw output of block k, which is the model's own
``hidden_states[k]``; k = the last layer keeps the model exactly as it is (final norm
included). Blocks past k are never run, and no parameter is left without a gradient.

Freezing policies:
    ``frozen``  nothing trains; the trunk stays in eval mode (dropout off) so it computes one
                fixed function, which is what lets ``feature_cache`` store its outputs.
    ``last_n``  the last ``last_n`` kept blocks train, with the final norm after them where the
                model has one; the frozen rest stays in eval mode.
    ``full``    everything trains.
Parameters a model keeps fixed by design (Whisper's sinusoidal positions) stay frozen under
every policy; parameters the tokens never reach are deleted.

Reference: Hugging Face transformers (Wolf et al. 2020, arXiv:1910.03771), ``hidden_states``
convention: entry 0 is the embedding output, entry k the output of block k.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from polymodal.errors import ConfigError

FREEZE_POLICIES = ("frozen", "last_n", "full")
# Where the blocks sit, across model families and transformers versions (ViT moved its
# ``encoder.layer`` to ``layers`` in v5): the first path that is a ModuleList wins.
BLOCK_PATHS = ("layers", "encoder.layers", "encoder.layer")
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class TrunkLayout:
    """What a family's trunk holds besides its blocks.

    Attributes:
        final_norm: path of the norm applied to the tokens after the last block; None if none.
        unused: paths of modules the tokens never pass through (pooling heads); replaced by
            identities.
        unused_params: parameters of the trunk the tokens never reach; deleted.
        fixed_params: parameters the model keeps fixed by design (Whisper's sinusoidal
            positions); kept, never trained.
    """

    final_norm: str | None = None
    unused: tuple[str, ...] = ()
    unused_params: tuple[str, ...] = ()
    fixed_params: tuple[str, ...] = ()


@dataclasses.dataclass
class Trunk:
    """The prepared trunk. ``trainable`` lists the modules ``last_n`` / ``full`` train."""

    num_layers: int  # blocks kept
    policy: str
    trainable: list[nn.Module]
    fixed: set[str]  # parameter names that never train


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def find_blocks(trunk: nn.Module) -> str:
    """The path of the trunk's ModuleList of transformer blocks."""
    for path in BLOCK_PATHS:
        if isinstance(_get(trunk, path), nn.ModuleList):
            return path
    looked = ", ".join(BLOCK_PATHS)
    raise ConfigError(f"cannot find the transformer blocks of {type(trunk).__name__} (looked at {looked})")


def resolve_layer(layer: int, num_layers: int, where: str) -> int:
    """``layer`` (1..L, or -1..-L counting from the last) -> blocks to keep, 1..L."""
    kept = layer if layer > 0 else num_layers + 1 + layer
    if not 1 <= kept <= num_layers:
        choices = f"1..{num_layers} or -1..-{num_layers}"
        raise ConfigError(f"{where}={layer}: the model has {num_layers} layers; use {choices}")
    return kept


def prepare_trunk(
    trunk: nn.Module, layout: TrunkLayout, *, layer: int, freeze: str, last_n: int, where: str
) -> Trunk:
    """Cut ``trunk`` at ``layer``, drop its unused modules, and freeze it by policy (in place).

    Args:
        trunk: the loaded Hugging Face encoder (vision tower, audio encoder).
        layout: the family's ``TrunkLayout``.
        layer: which block's output the tokens are (see ``resolve_layer``); -1 the last.
        freeze: one of ``FREEZE_POLICIES``.
        last_n: blocks that train under ``last_n``.
        where: the config prefix for messages, e.g. ``"model.encoders.image"``.
    """
    if freeze not in FREEZE_POLICIES:
        raise ConfigError(f"{where}.freeze: {freeze!r}; valid: {', '.join(FREEZE_POLICIES)}")
    for name in layout.unused_params:
        if hasattr(trunk, name):
            delattr(trunk, name)
    for path in layout.unused:
        if _get(trunk, path) is not None:
            _set(trunk, path, nn.Identity())
    blocks_path = find_blocks(trunk)
    blocks = _get(trunk, blocks_path)
    kept = resolve_layer(layer, len(blocks), f"{where}.layer")
    final_norm = _get(trunk, layout.final_norm) if layout.final_norm else None
    if kept < len(blocks):
        _set(trunk, blocks_path, nn.ModuleList(list(blocks)[:kept]))
        if final_norm is not None:
            _set(trunk, layout.final_norm, nn.Identity())
            final_norm = None
        if hasattr(trunk.config, "num_hidden_layers"):
            trunk.config.num_hidden_layers = kept
    if freeze == "last_n" and not 1 <= last_n <= kept:
        raise ConfigError(f"{where}.last_n={last_n}: with freeze=last_n, train 1..{kept} of the {kept} kept layers")
    trainable: list[nn.Module] = []
    if freeze == "full":
        trainable = [trunk]
    elif freeze == "last_n":
        trainable = list(_get(trunk, blocks_path))[kept - last_n :] + ([final_norm] if final_norm is not None else [])
    result = Trunk(num_layers=kept, policy=freeze, trainable=trainable, fixed=set(layout.fixed_params))
    apply_freeze(trunk, result)
    return result


def apply_freeze(trunk: nn.Module, prepared: Trunk) -> None:
    """Set ``requires_grad`` on the trunk by its policy (idempotent)."""
    trunk.requires_grad_(False)
    for module in prepared.trainable:
        module.requires_grad_(True)
    for name, p in trunk.named_parameters():
        if name in prepared.fixed:
            p.requires_grad_(False)


def set_train_mode(trunk: nn.Module, prepared: Trunk, mode: bool) -> None:
    """Training mode for the trainable modules only: frozen parts keep dropout off."""
    trunk.train(False)
    for module in prepared.trainable:
        module.train(mode)


def encoder_train(encoder: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` for an encoder holding the Hugging Face ``model`` and its prepared ``trunk``
    (``hf_image``, ``hf_audio`` bind it as their method): only the trainable parts train."""
    nn.Module.train(encoder, mode)
    set_train_mode(encoder.model, encoder.trunk, mode)
    return encoder


def encoder_apply_freeze(encoder: nn.Module) -> None:
    """Re-apply the encoder's own freezing policy, after something reset ``requires_grad`` (the
    model-wide ``apply_freeze_policy`` calls it)."""
    apply_freeze(encoder.model, encoder.trunk)


def read_preprocessor_config(folder: Path, where: str) -> dict:
    """The folder's ``preprocessor_config.json`` (image processor or feature extractor settings)."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        raise ConfigError(
            f"{where}: {folder} has no {PREPROCESSOR_FILE}; save the model's image processor / feature "
            f"extractor there too (processor.save_pretrained(folder))"
        )
    return json.loads(path.read_text())
