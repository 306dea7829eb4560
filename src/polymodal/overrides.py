"""How config layers combine: merging one mapping into another, and ``key=value`` overrides.

Mappings merge key by key at every level, so an override says only what differs. Three rules keep
a merge from leaving stale settings behind:

* a part spec whose ``name`` changes is replaced whole (the old part's settings do not fit the new);
* a ``source`` that changes drops the ``options`` beside it (``data.source`` and ``data.options``);
* an override can replace instead of merge: ``key:=value`` puts ``value`` in place of whatever
  ``key`` held (a mapping is not merged into, a list is not kept), and an empty mapping or list,
  ``key={}`` or ``key=[]``, clears ``key`` (merging nothing would change nothing, so that is what
  it means). Lists are always replaced whole by ``key=[...]``; ``:=`` matters for mappings:
  ``model.heads:={image: {name: flow_matching}}`` drops every other head spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

from polymodal.errors import ConfigError

# A key whose value names a part, and the key holding that part's settings beside it: when the
# part changes, its old settings go (``data.source`` and ``data.options``).
SETTINGS_OF = {"source": "options"}
REPLACE_MARK = ":"  # ``key:=value`` replaces


@dataclasses.dataclass(frozen=True)
class Replace:
    """An override value that takes the place of what it overrides instead of merging into it."""

    value: Any


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Replace) else value


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base`` by the rules of the module's docstring."""
    out = dict(base)
    for key, settings in SETTINGS_OF.items():
        if key in update and key in out and _plain(update[key]) != out[key]:
            out.pop(settings, None)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, Replace):
            out[key] = value.value
        elif isinstance(old, dict) and isinstance(value, Mapping):
            if "name" in value and "name" in old and value["name"] != old["name"]:
                out[key] = dict(value)
            else:
                out[key] = deep_merge(old, value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}``; the value is read as YAML. With
    ``key:=value``, or an empty mapping or list, the value is wrapped in ``Replace``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (or key:=value to replace), e.g. train.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    replace = key.endswith(REPLACE_MARK)
    key = key.removesuffix(REPLACE_MARK).strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key; expected e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if replace or (isinstance(value, (dict, list)) and not value):
        value = Replace(value)
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested
