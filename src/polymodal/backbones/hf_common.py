"""Loading Hugging Face parts from a local folder only: path checks and the lazy ``transformers`` import.

A pretrained part is named by a folder written by ``save_pretrained`` (or copied out of a model
package). Nothing is downloaded: a hub name such as ``gpt2`` that is not a folder on disk is an
error that names the path, never a silent download. ``transformers`` is imported here, on first
use, so that importing polymodal stays fast and works without it. Under a ``torch.device("meta")``
context the model is built from its config alone (shapes, no weights read), as every part must
build on the meta device.

Reference: the ``from_pretrained(..., local_files_only=True)`` loading API of Hugging Face
transformers (Wolf et al. 2020, arXiv:1910.03771).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from polymodal.errors import ConfigError

# Every Hugging Face model folder holds this; without it the folder is not a saved model.
CONFIG_FILE = "config.json"


def resolve_local_folder(path: str | Path, *, what: str) -> Path:
    """The absolute folder of a saved Hugging Face model, or a ConfigError naming ``path``.

    Args:
        path: a folder written by ``save_pretrained``; ``~`` is expanded.
        what: what the folder is for, used in the message (e.g. ``"model.backbone.path"``).

    Returns:
        The resolved folder.

    Raises:
        ConfigError: the folder is missing, is not a folder, or has no ``config.json``.
    """
    if not str(path):
        raise ConfigError(f"{what}: empty path; give the folder of a saved Hugging Face model (nothing is downloaded)")
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise ConfigError(
            f"{what}: {folder} does not exist. Pretrained parts load from a local folder only and nothing is "
            f"downloaded; save the model there first (model.save_pretrained / tokenizer.save_pretrained)"
        )
    if not folder.is_dir():
        raise ConfigError(
            f"{what}: {folder} is not a folder; give the folder a model was saved to (nothing is downloaded)"
        )
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{what}: {folder} has no {CONFIG_FILE}, so it is not a saved Hugging Face model (nothing is downloaded)"
        )
    return folder


def import_transformers() -> types.ModuleType:
    """``import transformers``, or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "pretrained Hugging Face parts need the `transformers` package: pip install transformers"
        ) from None
    return transformers


def load_pretrained(auto_class: Any, folder: Path, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(folder)`` in fp32 from local files only; on the meta device,
    ``from_config`` instead (same modules and shapes, nothing read or allocated).

    Args:
        auto_class: a transformers auto class, e.g. ``transformers.AutoModelForCausalLM``.
        folder: from ``resolve_local_folder``.
        kwargs: passed on (e.g. ``attn_implementation``).
    """
    transformers = import_transformers()
    # fp32 weights whatever the checkpoint's dtype: mixed precision is decided by the training loop.
    if torch.empty(0).device.type == "meta":  # the default device a `with torch.device(...)` sets
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        return auto_class.from_config(config, dtype=torch.float32, **kwargs)
    return auto_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kwargs)
