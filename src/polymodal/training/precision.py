"""The mixed-precision policy: which autocast dtype a run uses, decided once, and the autocast context.

Master weights, optimiser state and gradients stay fp32; only the forward pass runs under autocast.
bf16 is chosen over fp16 because its fp32-sized exponent needs no loss scaling
(Micikevicius et al. 2018, Mixed Precision Training, arXiv:1710.03740, is the fp16 alternative).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator

import torch

from polymodal.errors import ConfigError

log = logging.getLogger(__name__)

# "auto" picks bf16 on CPU only when a measured bf16 matmul beats fp32 by at least this factor.
# Without native bf16 instructions (AVX512-BF16 / AMX) PyTorch emulates bf16 and runs far slower;
# with AVX512-BF16 alone it can still be slower (BENCHMARKS.md "Training throughput": half the fp32
# rate on the 2-core Xeon the main job runs on).
BF16_MIN_SPEEDUP = 1.2
# The probe: a (rows x width) @ (width x 4 width) linear layer, the shape of a transformer's
# feed-forward at the presets' widths, timed in alternation so that load from other processes hits
# both dtypes alike; each dtype's fastest repeat counts (a noisy probe would flip the precision).
_PROBE_ROWS, _PROBE_WIDTH = 1024, 256
_PROBE_REPEATS = 10


def _linear_seconds(dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, float]:
    """Fastest of ``_PROBE_REPEATS`` alternating runs of the probe's linear layer, per dtype."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_ROWS, _PROBE_WIDTH, generator=generator)
    weight = torch.randn(4 * _PROBE_WIDTH, _PROBE_WIDTH, generator=generator)
    inputs = {dtype: (x.to(dtype), weight.to(dtype)) for dtype in dtypes}
    best = dict.fromkeys(dtypes, float("inf"))
    for dtype, (a, b) in inputs.items():
        torch.nn.functional.linear(a, b)  # warm up kernels and caches
    for _ in range(_PROBE_REPEATS):
        for dtype, (a, b) in inputs.items():
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def cpu_runs_bf16_fast() -> bool:
    """Whether this CPU runs bf16 matmul natively and faster than fp32 (checked once per process).

    A CPU without AVX512-BF16 or AMX is ruled out without measuring; otherwise a short matmul probe
    confirms the speed-up (a build without oneDNN bf16 kernels would emulate it, and some CPUs with
    the instructions still run bf16 slower).
    """
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not native:
        log.debug("CPU capability %s has no native bf16", torch.backends.cpu.get_cpu_capability())
        return False
    seconds = _linear_seconds((torch.float32, torch.bfloat16))
    speedup = seconds[torch.float32] / max(seconds[torch.bfloat16], 1e-9)
    log.debug("CPU bf16 matmul speed-up over fp32: %.2fx", speedup)
    return speedup >= BF16_MIN_SPEEDUP


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Turn ``train.precision`` into the autocast dtype for ``device``.

    Args:
        precision: ``auto`` (bf16 on CUDA when supported, on CPU when it runs bf16 fast; else fp32),
            ``bf16`` or ``fp32``.
        device: where the model runs.

    Returns:
        ``torch.bfloat16``, or ``None`` for plain fp32 (no autocast).
    """
    if precision == "fp32":
        return None
    if precision not in ("auto", "bf16"):
        raise ConfigError(f"train.precision: {precision!r} is not valid; valid: auto, bf16, fp32")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp32")
        return torch.bfloat16 if supported else None
    if device.type == "cpu":
        fast = cpu_runs_bf16_fast()
        if precision == "bf16":
            if not fast:
                log.warning("train.precision=bf16 on a CPU without native bf16: expect it to run slower than fp32")
            return torch.bfloat16
        return torch.bfloat16 if fast else None
    if precision == "bf16":
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast the forward pass to ``dtype`` on ``device``; a no-op when ``dtype`` is None (fp32)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
