"""The on-disk cache of built datasets: one ``.npz`` file per set of build parameters.

Folder: ``$POLYMODAL_CACHE`` if set, else ``~/.cache/polymodal``. The file name is
``<name>-<hash>.npz`` where the hash covers every build parameter and ``FORMAT_VERSION``. Arrays
are stored with ``np.savez`` (uncompressed: loading 20,000 samples takes about a second); strings
and small values go into the same archive as a JSON document (a uint8 array under ``JSON_KEY``),
so nothing is pickled and loading uses ``allow_pickle=False``. Writes go to a temporary file in the
same folder and are moved into place with ``os.replace``, so a reader sees a whole entry or none,
even when two processes build the same entry at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the layout of cached files changes
ENV_VAR = "POLYMODAL_CACHE"
DEFAULT_DIR = Path("~/.cache/polymodal")
JSON_KEY = "__json__"
HASH_CHARS = 16  # 64 bits of sha256: collisions are not a concern for a few cache entries


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$POLYMODAL_CACHE``, else ~/.cache/polymodal."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_DIR.expanduser()


def cache_key(params: Mapping[str, Any]) -> str:
    """Hex digest of the JSON of ``params`` (sorted keys) and FORMAT_VERSION."""
    text = json.dumps({"format_version": FORMAT_VERSION, **params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def cache_path(name: str, params: Mapping[str, Any], *, cache_dir: str | Path | None = None) -> Path:
    """Where the entry for ``name`` built with ``params`` lives (it may not exist yet)."""
    return cache_root(cache_dir) / f"{name}-{cache_key(params)}.npz"


def save_entry(path: Path, arrays: Mapping[str, np.ndarray], values: Mapping[str, Any]) -> None:
    """Write arrays plus JSON-able ``values`` to ``path`` atomically.

    Raises:
        ValueError: an array name collides with JSON_KEY or an array has dtype object.
    """
    if JSON_KEY in arrays:
        raise ValueError(f"array name {JSON_KEY!r} is reserved for the JSON part")
    for key, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise ValueError(f"array {key!r} has dtype object, which would need pickle; store it in values")
    blob = np.frombuffer(json.dumps(dict(values)).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:  # a file object: savez must not append ".npz"
            np.savez(handle, **{JSON_KEY: blob}, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("cached %s (%.1f MB)", path, path.stat().st_size / 1e6)


def load_entry(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Read an entry written by ``save_entry``; None when it is missing or unreadable (rebuild then)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        values = json.loads(arrays.pop(JSON_KEY).tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError) as exc:  # truncated or foreign file: rebuild
        logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
        return None
    return arrays, values
