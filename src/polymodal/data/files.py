"""Whether a media path names a file, for the loaders and the manifest alike."""

from __future__ import annotations

from pathlib import Path


def is_file(path: Path) -> bool:
    """``path.is_file()``, False also where the name itself cannot be looked up (too long, ...)."""
    try:
        return path.is_file()
    except OSError:
        return False
