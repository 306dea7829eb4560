"""A small registry per kind of part: register a class under a name, check a spec, build it.

The constructor is the schema (see STYLE.md): positional arguments are wiring the assembler passes
(``dim_in``, ``dim_out``), keyword-only arguments are settings a config may change. ``check`` reads
the signature, so a wrong name or key fails before any tensor is allocated. One class may serve
several names with part of its wiring bound (``add("image_to_text", partial(Task, IMAGE, TEXT))``).
A part whose settings nest (a mapping inside a setting) checks them in a classmethod
``check_settings(settings, where)`` that raises ConfigError; ``check`` calls it after the signature
checks.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from polymodal.errors import ConfigError

T = TypeVar("T")

# Annotation -> accepted Python types for a config value. Ints are valid floats (YAML writes 1, not 1.0).
_SIMPLE_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
    str: (str,),
}


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits a simple annotation; unknown or complex annotations accept anything."""
    if annotation is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if annotation in _SIMPLE_TYPES:
        if isinstance(value, bool) and annotation is not bool:
            return False  # True is an int in Python, never a width in a config
        return isinstance(value, _SIMPLE_TYPES[annotation])
    return True


class Registry(Generic[T]):
    """Maps names to part classes of one kind (encoders, projectors, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._parts: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@ENCODERS.register("vit")``."""

        def decorate(cls: type[T]) -> type[T]:
            self.add(name, cls)
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def add(self, name: str, factory: Callable[..., T]) -> None:
        """Register a class, or a ``functools.partial`` of one that binds part of its wiring."""
        if name in self._parts:
            raise ValueError(f"{self.kind} {name!r} is already registered by {_qualname(self._parts[name])}")
        self._parts[name] = factory

    def names(self) -> list[str]:
        return sorted(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def get(self, name: str) -> type[T]:
        if name not in self._parts:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._parts[name]

    def settings(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword-only constructor parameters of a part: what a config may set."""
        params = inspect.signature(self.get(name)).parameters
        return {k: p for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def check(self, spec: Mapping[str, Any], where: str = "") -> tuple[type[T], dict[str, Any]]:
        """Validate ``{"name": ..., **settings}`` against the constructor; return (class, settings)."""
        where = where or self.kind
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'name' key; valid names: {', '.join(self.names())}")
        name = spec["name"]
        cls = self.get(name) if name in self._parts else None
        if cls is None:
            raise ConfigError(f"{where}.name: unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        settings = self.settings(name)
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        for key, value in kwargs.items():
            if key not in settings:
                valid = ", ".join(sorted(settings)) or "(none)"
                raise ConfigError(f"{where}.{key}: unknown setting of {self.kind} {name!r}; valid: {valid}")
            annotation = _resolve_annotation(cls, key, settings[key].annotation)
            if not _accepts(annotation, value):
                raise ConfigError(f"{where}.{key}: {value!r} is not a valid {_type_name(annotation)}")
        missing = [k for k, p in settings.items() if p.default is inspect.Parameter.empty and k not in kwargs]
        if missing:
            raise ConfigError(f"{where}: {self.kind} {name!r} needs {', '.join(missing)}")
        check_nested = getattr(cls, "check_settings", None)
        if check_nested is not None:  # a part whose settings nest (e.g. a backbone's moe mapping)
            check_nested(kwargs, where)
        return cls, kwargs

    def build(self, spec: Mapping[str, Any], *wiring: Any, where: str = "", **named_wiring: Any) -> T:
        """Check ``spec`` then construct the part with the assembler's wiring arguments. A
        ValueError the constructor raises about its settings becomes a ConfigError naming ``where``."""
        cls, kwargs = self.check(spec, where)
        try:
            return cls(*wiring, **named_wiring, **kwargs)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{where or self.kind}: {exc}") from None


def _qualname(factory: Any) -> str:
    return _class_of(factory).__qualname__


def _class_of(factory: Any) -> Any:
    """The class behind a registered factory (a class, or a partial of one)."""
    return factory.func if isinstance(factory, functools.partial) else factory


def _resolve_annotation(cls: Any, key: str, annotation: Any) -> Any:
    """Annotations are strings under ``from __future__ import annotations``; resolve them if we can."""
    if isinstance(annotation, str):
        try:
            return typing.get_type_hints(_class_of(cls).__init__).get(key, inspect.Parameter.empty)
        except Exception:  # an unresolvable forward reference: accept any value rather than guess
            return inspect.Parameter.empty
    return annotation


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))
