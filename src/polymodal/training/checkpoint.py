"""Checkpoints for exact resume: safetensors weights + a ``weights_only``-loadable training state,
written atomically.

Layout of ``run_dir/checkpoints/``::

    step_0000200/model.safetensors   model state dict (shared/tied tensors stored once)
    step_0000200/state.pt            optimiser, scheduler, RNG states (torch, CUDA, random, numpy), extra
    latest                           text file: the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, then ``latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact and ``latest``
never names a partial one. ``state.pt`` holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: opening a checkpoint never runs pickled code.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from polymodal.errors import DataError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(DataError):
    """A checkpoint is missing, incomplete or corrupt. The message names the path and what to do."""


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain values (safe for ``weights_only`` loading)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),  # (624,) uint32 words of MT19937
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d: CUDA RNG not restored",
                len(state["cuda"]), torch.cuda.device_count(),
            )


# ----------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for child in ckpt_dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / MODEL_FILE).is_file() and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _write_latest(ckpt_dir: Path, name: str) -> None:
    tmp = ckpt_dir / f"{_TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, ckpt_dir / LATEST_FILE)
    _fsync_dir(ckpt_dir)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step_{step:07d}/`` atomically and point ``latest`` at it.

    Args:
        run_dir: the run folder.
        step: optimiser steps taken so far.
        model: its state dict goes to ``model.safetensors``.
        optimizer: state saved when given.
        scheduler: state saved when given.
        extra_state: tensors and plain values (ints, floats, strings, lists, dicts), e.g. the data
            position; returned by :func:`load_checkpoint`.
        keep: keep only the newest ``keep`` checkpoints; None or 0 keeps all.

    Returns:
        The checkpoint folder.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(f"{_TMP_PREFIX}*"):  # left by a process killed mid-save
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()

    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        # save_model stores tensors that share memory (tied embeddings) once and restores the tie.
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
        state = {
            "format": FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": capture_rng_state(),
            "extra": extra_state,
        }
        torch.save(state, tmp / STATE_FILE)
        for name in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old copy aside, then swap
            old = ckpt_dir / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(ckpt_dir, final.name)
    log.info("saved checkpoint %s", final)

    if keep:
        for _, old_dir in _step_dirs(ckpt_dir)[:-keep]:
            if old_dir != final:
                shutil.rmtree(old_dir)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None when it has none.

    Follows ``checkpoints/latest``; if that file is missing or names a folder that is gone, falls
    back to the complete ``step_*`` folder with the highest step.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if (named / MODEL_FILE).is_file() and (named / STATE_FILE).is_file():
            return named
        log.warning("%s names %s, which is incomplete; using the newest complete checkpoint", pointer, named)
    found = _step_dirs(ckpt_dir)
    return found[-1][1] if found else None


def load_checkpoint(
    path_or_run_dir: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and optimiser, scheduler, global RNGs when asked).

    Args:
        path_or_run_dir: a checkpoint folder, or a run folder (its latest checkpoint is used).
        model: receives the weights (strict: every key must match).
        optimizer: receives the optimiser state when given.
        scheduler: receives the scheduler state when given.
        restore_rng: also restore the torch, CUDA, ``random`` and numpy RNG states (exact resume).

    Returns:
        ``{"step": step, **extra_state}`` as saved.
    """
    path = Path(path_or_run_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint folder or a run folder")
    if not (path / MODEL_FILE).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"no checkpoint in {path / CHECKPOINT_DIR}: expected step_*/{MODEL_FILE} and {STATE_FILE}; "
                "train first, or start without resuming"
            )
        path = found
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path / MODEL_FILE), strict=False)
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{path / MODEL_FILE} is corrupt or unreadable ({exc}); delete {path} to fall back to an older checkpoint"
        ) from exc
    except RuntimeError as exc:  # load_state_dict: same names, other shapes
        raise CheckpointError(f"{path / MODEL_FILE} does not match the model: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path / MODEL_FILE} does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was it saved from a different model config?"
        )
    state_path = path / STATE_FILE
    if not state_path.is_file():
        if optimizer is not None or scheduler is not None or restore_rng:
            raise CheckpointError(f"{state_path} is missing: this checkpoint holds weights only and cannot resume")
        return {}
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{state_path} is corrupt or unreadable ({exc}); delete {path} to fall back to an older checkpoint"
        ) from exc
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{state_path} holds no optimiser state; it cannot resume training")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise CheckpointError(f"{state_path} holds no scheduler state; it cannot resume training")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    log.info("loaded checkpoint %s (step %d)", path, state["step"])
    return {"step": state["step"], **state["extra"]}
