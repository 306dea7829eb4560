"""The model as the training loop drives it in a data-parallel run: wrapped in PyTorch's
DistributedDataParallel, which averages gradients over ranks during the backward pass.

Settings, and why:
- ``find_unused_parameters``: a step can leave parameters without a gradient on one rank and not on
  another (a task with no items in that rank's batch, an expert no token chose); DDP then still
  averages them (as zero on the ranks that did not use them).
- ``forward_sync_buffers=False`` (rank 0's buffers are copied once, at wrapping): the buffers that
  change while training keep themselves in step (the VQ codebook's statistics are summed over
  ranks, ``tokenizers/vector_quantizer.py``), so copying rank 0's buffers before every forward
  would only cost time.
- Gradient accumulation: micro-batches before the last run under ``no_sync``, so gradients are
  averaged once per optimiser step.

Reference: Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel Training,
arXiv:2006.15704.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from polymodal.distributed.process import world_size
from polymodal.errors import ConfigError


# A conv weight with one input channel has two equally valid stride layouts; DDP warns (at every
# backward) when its gradient's differs from the bucket's, which costs one copy and changes no number.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def data_parallel(model: nn.Module, device: torch.device, *, gradient_surgery: bool = False) -> nn.Module:
    """``model`` wrapped for training on every rank (``model`` itself in a single process). DDP
    copies rank 0's parameters and buffers to every rank here, so all ranks start the same.

    Raises:
        ConfigError: gradient surgery is on (it differentiates each loss term in its own backward
            pass, and DDP averages once per forward).
    """
    if world_size() == 1 or isinstance(model, FSDPModule):  # FSDP reduces the gradients itself
        return model
    if gradient_surgery:
        raise ConfigError(
            "train.gradient_surgery is not supported with several processes yet; "
            "set train.gradient_surgery.name=none or train in one process"
        )
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=True,
    )


def gradient_sync(model: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
    """Around one micro-batch's forward and backward: DDP averages gradients only after the ``last``
    micro-batch of a step (the others accumulate locally, ``no_sync``)."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    if isinstance(model, FSDPModule) and not last:
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    """FSDP's counterpart of ``no_sync``: gradients stay unreduced (and unsharded) on this rank."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
