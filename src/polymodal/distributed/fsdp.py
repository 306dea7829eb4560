"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) as an option
(``train.fsdp=true``): each rank holds 1/W of the backbone's blocks and of the rest of the model,
their gradients and optimiser state, and gathers a block's weights just before using them. DDP
(the default) replicates all of it on every rank.

Checkpoints are sharded: every rank writes its own shards with ``torch.distributed.checkpoint``
into ``step_N/sharded/`` (no rank gathers the whole model), rank 0 writes ``state.pt`` beside it
(schedule, RNGs, data position). The checkpoint loads at another world size too (the checkpoint
library reshards). At the end of a run the whole model is gathered once, to
``model.safetensors`` in the last checkpoint, for inference in one process.

Parameters FSDP cannot shard (a scalar, CLIP's logit scale) stay whole on every rank; their
gradients are averaged here. For evaluation every rank gathers the whole model for a moment
(``gathered``), and rank 0 evaluates alone, as under DDP.

Reference: Zhao et al. 2023, PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel,
arXiv:2304.11277.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from polymodal.distributed.collectives import sum_over_ranks
from polymodal.distributed.process import active, barrier, is_main, world_size
from polymodal.errors import ConfigError
from polymodal.training.checkpoint import (
    MODEL_FILE,
    SHARDED_DIR,
    STATE_FILE,
    capture_rng_state,
    point_latest,
    prune_checkpoints,
    step_folder,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-sharded-"  # one name on every rank (they write into the same folder)


@dataclasses.dataclass
class ShardedModel:
    """What :func:`shard_model` leaves to the training loop.

    Attributes:
        replicated: the parameters kept whole on every rank; :meth:`average_gradients` after backward.
    """

    replicated: list[nn.Parameter]

    def average_gradients(self) -> None:
        """Average the replicated parameters' gradients over ranks (a missing one counts as zero)."""
        if not self.replicated:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = sum_over_ranks(torch.cat([g.reshape(-1) for g in grads])) / world_size()
        for param, part in zip(self.replicated, flat.split([p.numel() for p in self.replicated])):
            param.grad = part.view_as(param).clone()


def check_sharding(train: Any) -> bool:
    """Whether ``train`` shards the model (``train.fsdp`` with several ranks training). Refuses
    ``train.fsdp`` with a setting that runs the model on rank 0 alone (live diagnostics, checkpoint
    selection) or differentiates each term apart (gradient surgery). The job asks this of every stage
    before the first one trains.

    Raises:
        ConfigError: naming the setting.
    """
    if not train.fsdp or world_size() == 1:
        return False
    clashes = {
        "train.diagnostics": bool(train.diagnostics.get("every", 0)),
        "train.select": train.select is not None,
        "train.gradient_surgery": train.gradient_surgery.get("name", "none") != "none",
    }
    for key, clash in clashes.items():
        if clash:
            raise ConfigError(f"train.fsdp=true does not support {key} yet; turn one of them off")
    return True


def start_sharding(model: nn.Module, train: Any) -> ShardedModel | None:
    """``model`` sharded when ``train.fsdp`` asks for it and several ranks train; else None.

    Raises:
        ConfigError: as ``check_sharding``.
    """
    if not check_sharding(train):
        return None
    return shard_model(model)


def shard_model(model: nn.Module) -> ShardedModel:
    """Shard ``model`` over the ranks in place: each block of ``model.backbone.blocks`` (when it has
    them) as a unit gathered for its own forward and backward, then the rest of the model as one.
    Build the optimiser after this (the parameters become sharded tensors)."""
    backbone = getattr(model, "backbone", None)
    for block in getattr(backbone, "blocks", []):
        fully_shard(block)
    replicated = [p for p in model.parameters() if p.ndim == 0]  # FSDP shards along dimension 0
    fully_shard(model, ignored_params=set(replicated))
    log.info("FSDP: %d blocks sharded over %d ranks", len(getattr(backbone, "blocks", [])), world_size())
    return ShardedModel(replicated)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Within the block every weight of a sharded ``model`` is whole on every rank (nothing changes
    for an unsharded one). Every rank enters it; then rank 0 may evaluate alone: evaluation calls
    the model's methods (generate, embed, reconstruct), not only the forward around which FSDP
    gathers, and the whole model is briefly on every rank."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def save_sharded_checkpoint(
    run_dir: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, extra_state: dict[str, Any], keep: int,
) -> Path:
    """Every rank's shards of the model and optimiser into ``step_N/sharded/``, rank 0's
    ``state.pt`` beside them; written into a temporary folder and renamed into place by rank 0, as
    ``checkpoint.save_checkpoint`` does. Every rank must call it."""
    final = step_folder(run_dir, step)
    ckpt_dir = final.parent
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED_DIR)
    if is_main():  # dcp.save returns on rank 0 once every rank's shards and the metadata are written
        state = dict(format=FORMAT_VERSION, step=step, optimizer=None, scheduler=scheduler.state_dict(),
                     rng=capture_rng_state(), extra=extra_state)  # fmt: skip
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        point_latest(ckpt_dir, final.name)
        prune_checkpoints(ckpt_dir, keep, final)
        log.info("saved sharded checkpoint %s", final)
    barrier()
    return final


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The shards of ``folder/sharded`` into the (sharded) ``model`` and ``optimizer``, at any world size."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=folder / SHARDED_DIR, no_dist=not active())  # one process: no group needed
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder / SHARDED_DIR, no_dist=not active())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def export_whole(model: nn.Module, folder: Path) -> None:
    """The whole model gathered (once) to rank 0's CPU and written to ``folder/model.safetensors``,
    for inference in one process. Every rank must call it."""
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        # A tied weight is stored once, under its first name, as safetensors.torch.save_model does.
        first_names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        tensors = {name: tensor.contiguous() for name, tensor in whole.items() if name in first_names}
        safetensors.torch.save_file(tensors, str(folder / MODEL_FILE))
        log.info("wrote the whole model to %s", folder / MODEL_FILE)
    barrier()
