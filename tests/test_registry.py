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


def test_nested_settings_are_checked_by_the_part():
    PARTS.check({"name": "nested", "inner": {"size": 3}})
    PARTS.check({"name": "nested"})
    with pytest.raises(ConfigError, match=r"^model.widget.inner: needs a size$"):
        PARTS.check({"name": "nested", "inner": {}}, where="model.widget")
