"""A test helper: nested results (dicts, lists, tuples of tensors and plain values) compared exactly,
naming the first place they differ. Importable as ``from nested import assert_same``."""

import torch


def assert_same(a, b, where: str = "state") -> None:
    """Nested dicts / lists of tensors and plain values, equal bitwise."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
