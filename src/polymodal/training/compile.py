"""``train.compile``: ``torch.compile`` (TorchInductor; C++/OpenMP kernels on CPU) over the model's
repeated blocks, the modules whose class sets ``compile_unit = True`` (the transformer block and the flow
U-Net's residual block).

Why blocks and not the whole model: the model's forward picks items by masks and reads values back
(task selection, lengths), which splits a whole-model graph into many pieces, and Inductor failed
on one of them (torch 2.13, a value-range error); a block is one clean graph over (B, N, D) or
(T, D) tokens. Shapes change from batch to batch (sequence lengths, kept tokens), so blocks are
compiled with dynamic shapes: one compilation serves every batch. Measured against the old step
(BENCHMARKS.md, "`train.compile` against commit c4f5646" and "Training throughput on a CPU with
AMX"): 1.24-1.25x against 1.03x uncompiled in fp32 without AMX, 1.77x against 1.51-1.62x in bf16
with AMX, after a first compilation of about 45 s. Off by default: over the main job's steps that
start-up costs about what the faster steps save (BENCHMARKS.md, "`train.compile` in `fit`": 7 min
43 s compiled against 7 min 54 s eager at 800 steps, within run-to-run noise; at 1,200 steps on a
Xeon with AMX stage 2 took 353 s compiled against 404 s eager). Blocks compile without
donated buffers, so that gradient surgery can take several gradients from one graph.

Reference: Ansel et al. 2024, PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
Transformation and Graph Compilation, ASPLOS (TorchDynamo and TorchInductor).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from polymodal.distributed.process import resolve_device
from polymodal.errors import ConfigError

log = logging.getLogger(__name__)


def check_compiler(train, device: str) -> None:
    """With ``train.compile`` on a CPU, refuse at once when TorchInductor finds no C++ compiler (it
    builds its CPU kernels with one); otherwise the first compiled step fails, after the stages
    before it have trained.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    if not train.compile or resolve_device(device).type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch: Inductor names the problem at the first compiled step
        return
    try:
        get_cpp_compiler()
    except Exception as exc:  # torch's InvalidCxxCompiler
        raise ConfigError(
            f"train.compile=true: TorchInductor builds its CPU kernels with a C++ compiler and found none ({exc}); "
            "install one (Debian: apt install g++) or set train.compile=false"
        ) from None


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, *, enabled: bool = True) -> Iterator[int]:
    """Inside the block, every sub-module of ``model`` whose class sets ``compile_unit = True`` runs
    compiled; afterwards they run eagerly again (evaluation and generation after training, whose
    KV-cache decoding would recompile at every new length). Yields how many modules were compiled
    (0 when not ``enabled`` or the model has none: it runs as it is)."""
    units = [module for module in model.modules() if getattr(type(module), "compile_unit", False)] if enabled else []
    for module in units:
        module.compile(dynamic=True)
    if units:
        log.info("train.compile: %d blocks compiled with dynamic shapes (the first steps take longer)", len(units))
    # Gradient surgery takes one gradient per loss from the same graph (retain_graph=True), which a
    # backward compiled with donated buffers refuses; they save memory, not time, so they are off.
    donation = torch._functorch.config.patch(donated_buffer=False) if units else contextlib.nullcontext()
    try:
        with donation:
            yield len(units)
    finally:
        for module in units:
            module._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward
