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
- Gradient surgery (``train.gradient_surgery``): the model is not wrapped. DDP averages inside a
  backward pass, from the hooks autograd runs as it accumulates into ``.grad``; the surgery
  differentiates each loss term with ``torch.autograd.grad``, which runs none of them, and needs
  each term's gradient averaged on its own, before the surgery (``term_gradients.py``). Wrapped,
  every forward would prepare DDP's reducer for a backward that never comes (an error at the next
  forward), and ``no_sync`` around every step would leave DDP doing nothing but its first copy of
  rank 0's weights, which is done here instead.

Reference: Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel Training,
arXiv:2006.15704.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from polymodal.distributed.collectives import broadcast_
from polymodal.distributed.process import world_size


# A conv weight with one input channel has two equally valid stride layouts; DDP warns (at every
# backward) when its gradient's differs from the bucket's, which costs one copy and changes no number.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def data_parallel(model: nn.Module, device: torch.device, *, gradient_surgery: bool = False) -> nn.Module:
    """``model`` wrapped for training on every rank (``model`` itself in a single process). Rank 0's
    parameters and buffers are copied to every rank here, so all ranks start the same. With
    ``gradient_surgery`` the model stays unwrapped (see the module docstring): the surgery averages
    each term's gradient over ranks itself.
    """
    if world_size() == 1 or isinstance(model, FSDPModule):  # FSDP reduces the gradients itself
        return model
    if gradient_surgery:
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                broadcast_(tensor)
        return model
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
