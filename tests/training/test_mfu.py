"""MFU: the FLOP count of a step checked by hand, and the meter's arithmetic (fit's logged MFU is
checked in test_loop.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polymodal.training import mfu
from polymodal.training.mfu import MFUMeter, counting, matmul_peak


def test_counting_a_linear_layer_by_hand():
    """Forward 2·B·in·out; backward twice that (gradients of the input and of the weight)."""
    layer = nn.Linear(8, 16)
    x = torch.randn(32, 8, requires_grad=True)
    with counting() as flops:
        layer(x).sum().backward()
    assert flops.total == 6 * 32 * 8 * 16
    with counting(enabled=False) as nothing:
        layer(x).sum().backward()
    assert nothing.total == 0


def test_meter_and_peak():
    meter = MFUMeter(peak=1e9)
    assert meter.mfu(100.0) == 0.0  # nothing counted yet
    meter.record(flops=10**9, samples=10)
    assert meter.mfu(samples_per_second=5.0) == pytest.approx(0.5)
    peak = matmul_peak(torch.float32, "cpu")
    assert peak > 1e8 and matmul_peak(torch.float32, "cpu") == peak  # measured once


def test_a_counted_first_call_leaves_a_compiled_module_to_compile():
    """fit counts its first step; a compiled block first called under the counting dispatch mode was
    never compiled afterwards, so ``train.compile`` left whole runs eager. The counted call runs
    eagerly and the next one compiles (a recording backend stands in for Inductor)."""
    torch._dynamo.reset()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    block = _Block()  # not a torch.nn class: Dynamo never traces torch's own module code
    block.compile(backend=backend)
    x = torch.randn(4, 8)
    with counting() as flops:
        block(x)
    assert flops.total == 2 * 4 * 8 * 16 and not graphs  # counted, and eagerly
    block(x)
    assert len(graphs) == 1


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


def test_the_peak_is_the_best_reading_of_the_process(monkeypatch):
    """Probed at the first call, then only when asked again, keeping the better reading: a probe
    that reads low (the host's cores shared for a while) does not lower the peak."""
    readings = iter([2e9, 1e9, 3e9])
    monkeypatch.setattr(mfu, "probe_matmul_peak", lambda dtype, device: next(readings))
    monkeypatch.setattr(mfu, "_PEAKS", {})
    assert mfu.matmul_peak(torch.bfloat16, "cpu") == 2e9
    assert mfu.matmul_peak(torch.bfloat16, "cpu") == 2e9  # cached: no probe
    assert mfu.matmul_peak(torch.bfloat16, "cpu", again=True) == 2e9  # read 1e9: kept 2e9
    assert mfu.matmul_peak(torch.bfloat16, "cpu", again=True) == 3e9
