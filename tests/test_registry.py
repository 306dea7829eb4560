"""Registry: specs are checked against constructors before anything is built."""

import pytest
from torch import nn

from polymodal.errors import ConfigError
from polymodal.registry import Registry

PARTS: Registry = Registry("widget")


@PARTS.register("scaler")
class Scaler(nn.Module):
    def __init__(self, dim: int, *, factor: float = 2.0, bias: bool = False, name_tag: str = "x") -> None:
        super().__init__()
        self.dim, self.factor, self.bias = dim, factor, bias


@PARTS.register("needs_depth")
class NeedsDepth(nn.Module):
    def __init__(self, *, depth: int) -> None:
        super().__init__()
        self.depth = depth


@PARTS.register("nested")
class Nested(nn.Module):
    def __init__(self, *, inner: dict | None = None) -> None:
        super().__init__()
        self.inner = inner

    @classmethod
    def check_settings(cls, settings, where):
        if settings.get("inner") is not None and "size" not in settings["inner"]:
            raise ConfigError(f"{where}.inner: needs a size")


def test_build_passes_wiring_and_settings():
    part = PARTS.build({"name": "scaler", "factor": 3}, 8)
    assert (part.dim, part.factor, part.bias) == (8, 3, False)


def test_names_and_duplicate_registration():
    assert PARTS.names() == ["needs_depth", "nested", "scaler"]
    with pytest.raises(ValueError, match="already registered"):
        PARTS.register("scaler")(Scaler)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "scalar"}, "unknown widget 'scalar'; valid: needs_depth, nested, scaler"),
        ({"name": "scaler", "facter": 1.0}, "unknown setting of widget 'scaler'; valid: bias, factor, name_tag"),
        ({"name": "scaler", "factor": "big"}, "'big' is not a valid float"),
        ({"name": "scaler", "bias": 1}, "1 is not a valid bool"),
        ({"name": "needs_depth"}, "needs depth"),
        ({"factor": 1.0}, "expected a mapping with a 'name' key"),
    ],
)
def test_bad_specs_fail_before_construction(spec, message):
    with pytest.raises(ConfigError) as info:
        PARTS.check(spec, where="model.widget")
    assert message in str(info.value)
    assert str(info.value).startswith("model.widget")


def test_wiring_arguments_are_not_settings():
    # `dim` is positional wiring: a config may not set it.
    with pytest.raises(ConfigError, match="unknown setting"):
        PARTS.check({"name": "scaler", "dim": 4})


def test_one_class_serves_several_names_with_bound_wiring():
    import functools

    class Pair(nn.Module):
        def __init__(self, left: str, right: str, dim: int, *, scale: float = 1.0) -> None:
            super().__init__()
            self.left, self.right, self.dim, self.scale = left, right, dim, scale

    registry: Registry = Registry("pair")
    registry.add("a_to_b", functools.partial(Pair, "a", "b"))
    registry.add("b_to_a", functools.partial(Pair, "b", "a"))
    assert list(registry.settings("a_to_b")) == ["scale"]  # bound wiring is not a setting
    built = registry.build({"name": "b_to_a", "scale": 2}, 8)
    assert (built.left, built.right, built.dim, built.scale) == ("b", "a", 8, 2)
    with pytest.raises(ConfigError, match="b_to_a.scale: 'x' is not a valid float"):
        registry.check({"name": "b_to_a", "scale": "x"}, where="b_to_a")
    with pytest.raises(ValueError, match="already registered by test_one_class"):
        registry.add("a_to_b", Pair)


def test_a_constructors_value_error_names_the_key():
    registry: Registry = Registry("thing")

    @registry.register("positive")
    class Positive:
        def __init__(self, *, size: int = 1) -> None:
            if size < 1:
                raise ValueError(f"size must be >= 1, got {size}")

    with pytest.raises(ConfigError, match=r"^model.thing: size must be >= 1, got 0$"):
        registry.build({"name": "positive", "size": 0}, where="model.thing")


def test_nested_settings_are_checked_by_the_part():
    PARTS.check({"name": "nested", "inner": {"size": 3}})
    PARTS.check({"name": "nested"})
    with pytest.raises(ConfigError, match=r"^model.widget.inner: needs a size$"):
        PARTS.check({"name": "nested", "inner": {}}, where="model.widget")
