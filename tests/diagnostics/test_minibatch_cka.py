"""Minibatch CKA: one batch equals the full unbiased CKA, the estimate closes in on it as batches
grow (and the biased variant does not), and it equals the minibatch CKA of torch-cka and
cka-pytorch run over the same batches through their own hook machinery."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polymodal.diagnostics import MinibatchCKA, cka

PEER_TOL = 1e-4  # both peers accumulate in float32


def _pair(n: int, *, seed: int = 0, center: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen, dtype=torch.float64) + center
    y = torch.tanh(x @ torch.randn(32, 48, generator=gen, dtype=torch.float64)) + 0.7 * torch.randn(n, 48, generator=gen, dtype=torch.float64)
    return x, y


def _minibatch(x: torch.Tensor, y: torch.Tensor, batch: int, **settings) -> float:
    acc = MinibatchCKA(**settings)
    for start in range(0, x.shape[0], batch):
        acc.update(x[start : start + batch], y[start : start + batch])
    return acc.compute()


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_a_single_batch_is_the_full_unbiased_cka(kernel):
    x, y = _pair(300, center=3.0)
    assert _minibatch(x, y, 300, kernel=kernel) == pytest.approx(cka(x, y, kernel=kernel, unbiased=True), abs=1e-12)


def test_minibatch_cka_approaches_the_full_value_as_batches_grow():
    x, y = _pair(4096)
    full = cka(x, y, unbiased=True)
    errors = [abs(_minibatch(x, y, batch) - full) for batch in (8, 64, 512)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] < 0.03 and errors[2] < 2e-3
    # The biased HSIC's per-batch bias does not average out: at batch 8 it is far off.
    assert abs(_minibatch(x, y, 8, unbiased=False) - cka(x, y)) > 0.2


def test_ragged_last_batch_and_reset():
    x, y = _pair(200, seed=1)
    acc = MinibatchCKA()
    for start in range(0, 200, 64):  # 64, 64, 64, 8
        acc.update(x[start : start + 64], y[start : start + 64])
    assert acc.num_batches == 4
    assert 0.3 < acc.compute() < 0.9
    acc.reset()
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    with pytest.raises(ValueError, match="batches of at least 4"):
        acc.update(x[:3], y[:3])
    with pytest.raises(ValueError, match="unknown CKA kernel"):
        MinibatchCKA(kernel="poly")


def test_constant_side_gives_nan():
    x, _ = _pair(64)
    acc = MinibatchCKA()
    acc.update(x, torch.zeros(64, 3))
    assert math.isnan(acc.compute())


# ----- peers: they read layer outputs through forward hooks, so the features are replayed -----


class _Replay(nn.Module):
    """Replays stored features: ``forward(idx)`` passes each representation's rows ``idx`` through
    an Identity tap, which is the layer output the peers' hooks record."""

    def __init__(self, reps: list[torch.Tensor]) -> None:
        super().__init__()
        self.reps = [r.float() for r in reps]  # the peers build float32 ones-vectors
        self.taps = nn.ModuleList(nn.Identity() for _ in reps)
        self.anchor = nn.Parameter(torch.zeros(1))  # cka-pytorch reads the device off a parameter

    def forward(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return [tap(rep[idx]) for tap, rep in zip(self.taps, self.reps)]


def _loader(n: int, batch: int) -> DataLoader:
    idx = torch.arange(n)
    return DataLoader(TensorDataset(idx, idx), batch_size=batch)  # (index, unused label) pairs


def test_matches_torch_cka_over_the_same_batches():
    torch_cka = pytest.importorskip("torch_cka")
    x, y = _pair(512, seed=2)
    peer = torch_cka.CKA(_Replay([x]), _Replay([y]), "x", "y", ["taps.0"], ["taps.0"], device="cpu")
    peer.compare(_loader(512, 64), _loader(512, 64))
    assert peer.export()["CKA"][0, 0].item() == pytest.approx(_minibatch(x, y, 64), abs=PEER_TOL)


def test_matches_cka_pytorch_over_the_same_batches():
    pytest.importorskip("cka_pytorch")
    from cka_pytorch.cka import CKACalculator

    x, y = _pair(512, seed=3)
    layers = ["taps.0", "taps.1"]
    peer = CKACalculator(_Replay([x, x**2]), _Replay([y, x]), layers, layers, device=torch.device("cpu"), verbose=False)
    got = peer.calculate_cka_matrix(_loader(512, 64), num_epochs=1, epsilon=0.0)  # (2, 2)
    for i, a in enumerate((x, x**2)):
        for j, b in enumerate((y, x)):
            assert got[i, j].item() == pytest.approx(_minibatch(a, b, 64), abs=PEER_TOL)
