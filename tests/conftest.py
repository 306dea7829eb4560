"""Fixtures shared across test folders."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _import_skipping_package_inits(module: str) -> types.ModuleType:
    """Import ``a.b.c`` without running ``a/__init__.py`` or ``a/b/__init__.py``.

    Some peer libraries (lightly, LibMTL) import torchvision in their package ``__init__``, which
    does not work here, although the one file we compare against needs only torch. Each parent
    package is stood in for by an empty module whose ``__path__`` points at the real folder, so the
    file itself and its own imports of sibling files still load.
    """
    parts = module.split(".")
    top = sys.modules.get(parts[0])
    if top is not None and getattr(top, "__path__", None):
        root = Path(top.__path__[0])
    else:
        spec = importlib.util.find_spec(parts[0])
        if spec is None or spec.origin is None:
            pytest.skip(f"{parts[0]} is not installed (pip install --no-deps {parts[0]})")
        root = Path(spec.origin).parent
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root.joinpath(*parts[1:depth]))]
            sys.modules[name] = stub
    return importlib.import_module(module)


@pytest.fixture(scope="session")
def peer_module():
    """``peer_module("lightly.loss.vicreg_loss")``: a peer library's file, its package ``__init__``
    files skipped; the test is skipped when the library is not installed."""
    return _import_skipping_package_inits
