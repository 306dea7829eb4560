"""Model FLOPs utilisation (MFU): the model's FLOPs per second of training over the machine's
measured matmul peak for the precision in use.

MFU = FLOPs of one training step / step time / peak (Chowdhery et al. 2022, PaLM,
arXiv:2204.02311, appendix B). The FLOPs are counted, not estimated: ``torch.utils.flop_counter``'s
``FlopCounterMode`` records every matmul, convolution and attention kernel of one whole step
(forward and backward) as it runs, at the shapes it runs (a step whose per-token layers skip
padding is counted without it). The count comes from the first step of a ``fit`` call; batches
differ in padding, so later steps differ from it by a few percent. Element-wise work is not
counted, by the convention. The peak is the fastest ``F.linear`` measured here on square matrices
of a few sizes, in the precision the step's matmuls run in: probed once per process, and again at
the end of a long ``fit``, the best reading kept. On a shared 2-core host (a cloud VM) the bf16
probe reads 290-430 GFLOP/s from one moment to the next, and about one probe in seven read about
half, 220-240 (a probe run for a whole second as well), so that a run logged MFU twice too high
(BENCHMARKS.md, "MFU's peak read low on a shared host").

The counted step runs eagerly, even with ``train.compile``: a compiled module whose first call
happens under a dispatch mode such as ``FlopCounterMode`` is never compiled afterwards (TorchDynamo,
torch 2.13, measured: no graph captured after 800 steps), so counting the first step compiled
would leave the whole run eager. Later steps compile as usual.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# Square sizes of the peak probe: the best of them is the peak (a small matmul can beat a large one
# on a busy machine, whose caches other processes share). A GPU reaches its plateau only with larger
# ones: a 2048^3 product takes tens of microseconds there, of the order of a kernel launch.
PEAK_SIZES = {"cpu": (512, 1024, 2048), "cuda": (2048, 4096, 8192)}
PEAK_REPEATS = 3


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU's); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PEAKS: dict[tuple[torch.dtype, str], float] = {}


def matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", *, again: bool = False) -> float:
    """This process's best reading of the matmul peak for ``dtype`` on ``device``: probed at the
    first call, and again (the best reading kept) when ``again``."""
    key = (dtype, device)
    if again or key not in _PEAKS:
        _PEAKS[key] = max(_PEAKS.get(key, 0.0), probe_matmul_peak(dtype, device))
    return _PEAKS[key]


def probe_matmul_peak(dtype: torch.dtype, device: str) -> float:
    """The best FLOP/s of an ``F.linear`` of ``PEAK_SIZES`` square matrices in ``dtype``, fastest of
    ``PEAK_REPEATS`` each."""
    where = torch.device(device)
    best = 0.0
    for size in PEAK_SIZES.get(where.type, PEAK_SIZES["cpu"]):
        generator = torch.Generator().manual_seed(size)
        a = torch.randn(size, size, generator=generator).to(device=where, dtype=dtype)
        b = torch.randn(size, size, generator=generator).to(device=where, dtype=dtype)
        F.linear(a, b)  # warm-up: kernel choice, JIT, first-touch pages
        for _ in range(PEAK_REPEATS):
            synchronize(where)
            start = time.perf_counter()
            F.linear(a, b)
            synchronize(where)
            best = max(best, 2 * size**3 / max(time.perf_counter() - start, 1e-12))
    return best


class FlopCount:
    """The FLOPs of one counted stretch of work (``counting``); ``total`` is 0 until it ends."""

    def __init__(self) -> None:
        self.total = 0


@contextlib.contextmanager
def counting(enabled: bool = True) -> Iterator[FlopCount]:
    """Count the matmul, convolution and attention FLOPs run inside the block (forward and
    backward), with compiled modules running eagerly there (see the module docstring); a no-op
    counting nothing when ``enabled`` is False."""
    count = FlopCount()
    if not enabled:
        yield count
        return
    mode = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), mode:
        yield count
    count.total = mode.get_total_flops()


class MFUMeter:
    """MFU from a step's counted FLOPs, the samples it trained and a measured throughput.

    Args:
        peak: the machine's matmul FLOP/s for the precision in use (``matmul_peak``).
    """

    def __init__(self, peak: float) -> None:
        self.peak = peak
        self.flops_per_sample = 0.0

    def record(self, flops: int, samples: int) -> None:
        """The counted step: ``flops`` for ``samples`` items."""
        self.flops_per_sample = flops / max(samples, 1)

    def mfu(self, samples_per_second: float) -> float:
        """The share of the peak used at ``samples_per_second`` (0 before a step was counted)."""
        return self.flops_per_sample * samples_per_second / self.peak
