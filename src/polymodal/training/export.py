"""One whole ``model.safetensors`` from a run's checkpoint, for inference in one process or
elsewhere (``polymodal export RUN``).

An ordinary checkpoint holds the whole model already; an FSDP run's checkpoint (``train.fsdp``)
holds one file of shards per rank (``torch.distributed.checkpoint``). Both load into the model built
from the run's config, in this one process and without a process group: the checkpoint library
reads every rank's shards and reassembles each tensor whole (``fsdp.load_sharded``). The model is
then written as training writes a checkpoint's weights (a tied weight once, under its first name),
so ``load_run``'s loader and any safetensors reader take the file.

Reference: Zhao et al. 2023, PyTorch FSDP, arXiv:2304.11277 (sharded state, resharded on load).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import safetensors.torch
from torch import nn

from polymodal.training.checkpoint import MODEL_FILE, load_checkpoint

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def export_weights(checkpoint: str | Path, model: nn.Module, out: str | Path) -> Path:
    """The weights of ``checkpoint`` (whole, or an FSDP run's shards) loaded into ``model`` and
    written whole to ``out``, atomically (a temporary file renamed into place).

    Args:
        checkpoint: a checkpoint folder (``step_N``, ``best``) or a run folder (its latest).
        model: built as the run builds it, on the CPU (it receives every weight; strict).
        out: the ``.safetensors`` file to write.
    """
    load_checkpoint(checkpoint, model=model)
    return write_weights(model, out, source=Path(checkpoint))


def write_weights(model: nn.Module, out: str | Path, *, source: Path) -> Path:
    """``model``'s state to ``out`` (safetensors, written beside it first, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(TMP_PREFIX + out.name)
    # save_model stores tensors that share memory (tied embeddings) once, as checkpoints do.
    safetensors.torch.save_model(model, str(tmp), metadata={"checkpoint": str(source)})
    os.replace(tmp, out)
    log.info("wrote the whole model of %s to %s", source, out)
    return out


def export_run(run_dir: str | Path, *, out: str | Path | None = None, checkpoint: str = "auto") -> Path:
    """``polymodal export``: the run's chosen checkpoint (``load_run``'s ``auto``, ``best`` or
    ``latest``) as one whole file, ``out`` or ``RUN/model.safetensors``. Reads no data."""
    from polymodal.training.run import load_run

    run = load_run(run_dir, checkpoint=checkpoint, device="cpu")  # the model and its checkpoint, shards or not
    return write_weights(run.model, out if out is not None else Path(run_dir) / MODEL_FILE, source=Path(run.checkpoint))
