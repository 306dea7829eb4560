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

A write that fails (a full disk, a read-only folder) removes its temporary folder and raises a
:class:`~polymodal.errors.RunError` naming the checkpoint and the cause; the previous checkpoint and
``latest`` are untouched. ``--resume`` starts from the newest checkpoint whose files are whole
(``checkpoint_check.py``).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from polymodal.errors import DataError, RunError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"  # an FSDP checkpoint's weights and optimiser, one file per rank (distributed/fsdp.py)
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
# What a failed write raises: OSError, but on a full disk safetensors raises a SafetensorError and
# torch.save a RuntimeError ("unexpected pos ..."), so the message adds the free space.
_WRITE_ERRORS = (OSError, RuntimeError, safetensors.SafetensorError)
_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "extra")
MAX_REASON_CHARS = 200  # a library's error message cut to one readable line
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(DataError):
    """A checkpoint is missing, incomplete or corrupt. The message names the path and what to do."""


def step_folder(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step_{step:07d}``: where the checkpoint of ``step`` is written."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}"


def one_line_reason(exc: BaseException) -> str:
    """An exception's message as one short line. ``torch.load`` explains a refused pickle over many
    lines; the line naming what was refused is the one worth keeping."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker) :].strip().split("\n")[0]
    else:
        text = text.strip().split("\n")[0]
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


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


def has_weights(folder: Path) -> bool:
    """Whether a checkpoint folder holds weights: ``model.safetensors``, or FSDP's shards."""
    return (folder / MODEL_FILE).is_file() or (folder / SHARDED_DIR / ".metadata").is_file()


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for child in ckpt_dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and has_weights(child) and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def point_latest(ckpt_dir: Path, name: str) -> None:
    """Replace ``latest`` atomically with one naming ``name``."""
    tmp = ckpt_dir / f"{_TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    try:
        tmp.write_text(name + "\n")
        _fsync_file(tmp)
        os.replace(tmp, ckpt_dir / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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

    Raises:
        RunError: the files could not be written (disk full, read-only folder); the previous
            checkpoint and ``latest`` are left as they were.
    """
    final = step_folder(run_dir, step)
    ckpt_dir = final.parent
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "extra": extra_state,
    }
    previous = latest_checkpoint(run_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(ckpt_dir)
        tmp.mkdir()
        # save_model stores tensors that share memory (tied embeddings) once and restores the tie.
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        _move_into_place(tmp, final)
        point_latest(ckpt_dir, final.name)
    except _WRITE_ERRORS as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(ckpt_dir, final, previous, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved checkpoint %s", final)
    if keep:
        prune_checkpoints(ckpt_dir, keep, final)
    return final


def _remove_leftovers(ckpt_dir: Path) -> None:
    """Temporary files and folders left by a process killed mid-save."""
    for stale in ckpt_dir.glob(f"{_TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _move_into_place(tmp: Path, final: Path) -> None:
    """Flush ``tmp``'s files and rename the folder to ``final`` (replacing an older copy)."""
    for name in (MODEL_FILE, STATE_FILE):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step: move the old copy aside, then swap
        old = final.parent / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_failure(ckpt_dir: Path, final: Path, previous: Path | None, exc: BaseException) -> RunError:
    try:
        space = f"; {shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free there"
    except OSError:
        space = ""
    kept = f"the previous checkpoint, {previous}, is intact" if previous is not None else "no earlier checkpoint exists"
    return RunError(
        f"could not write checkpoint {final} ({one_line_reason(exc)}{space}); {kept}; free some space or make "
        f"{ckpt_dir} writable, then continue with --resume"
    )


def prune_checkpoints(ckpt_dir: Path, keep: int, final: Path) -> None:
    """Remove all but the newest ``keep`` checkpoints (never ``final``); a failure only warns."""
    for _, old_dir in _step_dirs(ckpt_dir)[:-keep]:
        if old_dir != final:
            try:
                shutil.rmtree(old_dir)
            except OSError as exc:
                log.warning("could not remove the old checkpoint %s (%s); it stays", old_dir, exc)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None when it has none.

    Follows ``checkpoints/latest``; if that file is missing or names a folder that is gone, falls
    back to the complete ``step_*`` folder with the highest step.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text(errors="replace").strip()
        if has_weights(named) and (named / STATE_FILE).is_file():
            return named
        log.warning("%s names %s, which is incomplete; using the newest complete checkpoint", pointer, named)
    found = _step_dirs(ckpt_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- checking and loading


def read_state(state_path: Path) -> dict[str, Any]:
    """``state.pt`` loaded with ``torch.load(weights_only=True)``: tensors and plain values only, so
    a file crafted to run code when unpickled is refused, never run.

    Raises:
        CheckpointError: one line naming the file, when it is truncated, corrupt, holds pickled
            code, or is not a training state.
    """
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{state_path} holds something other than tensors and plain values, refused unread "
            f"({one_line_reason(exc)}); it is not a checkpoint polymodal wrote: delete it"
        ) from None
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, ... for a truncated or foreign file
        raise CheckpointError(f"{state_path} is corrupt or unreadable ({one_line_reason(exc)})") from None
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        raise CheckpointError(f"{state_path} is not a training state written by polymodal (keys {', '.join(_STATE_KEYS)})")
    return state


def _checkpoint_folder(path: Path) -> Path:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint folder or a run folder")
    if has_weights(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {path / CHECKPOINT_DIR}: expected step_*/{MODEL_FILE} and {STATE_FILE}; "
            "train first, or start without resuming"
        )
    return found


def _weights_step(path: Path) -> dict[str, int]:
    """``{"step": n}`` from a weights file's metadata (checkpoints and the best checkpoint write it), else ``{}``."""
    with safetensors.safe_open(str(path), framework="pt") as weights:
        step = (weights.metadata() or {}).get("step")
    return {} if step is None else {"step": int(step)}


def _load_weights(path: Path, model: nn.Module) -> None:
    """``model.safetensors`` into ``model``, strictly; a CheckpointError naming the file otherwise."""
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    except (safetensors.SafetensorError, OSError) as exc:
        reason = one_line_reason(exc)
        raise CheckpointError(f"{path} is corrupt or unreadable ({reason}); remove its folder to use an older checkpoint") from None
    except RuntimeError as exc:  # load_state_dict: same names, other shapes (one line per tensor)
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), one_line_reason(exc))
        raise CheckpointError(f"{path} does not match the model ({mismatch}); was it saved with another model config?") from None
    if missing or unexpected:
        names = f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        raise CheckpointError(f"{path} does not match the model: {names}; was it saved with another model config?")


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
        ``{"step": step, **extra_state}`` as saved; for weights only (the best checkpoint), the
        step their file records, or ``{}`` when it records none.

    Raises:
        CheckpointError: one line naming the file that is missing, corrupt or of another model.
    """
    path = _checkpoint_folder(Path(path_or_run_dir))
    if (path / SHARDED_DIR).is_dir() and (optimizer is not None or not (path / MODEL_FILE).is_file()):
        from polymodal.distributed.fsdp import load_sharded  # an FSDP run's (sharded) checkpoint

        load_sharded(path, model, optimizer)
        optimizer = None  # loaded with the weights
    else:
        _load_weights(path / MODEL_FILE, model)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        if optimizer is not None or scheduler is not None or restore_rng:
            raise CheckpointError(f"{state_path} is missing: this checkpoint holds weights only and cannot resume")
        return _weights_step(path / MODEL_FILE)
    state = read_state(state_path)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if state[name] is None:
            raise CheckpointError(f"{state_path} holds no {name} state; it cannot resume training")
        try:
            target.load_state_dict(state[name])
        except (ValueError, KeyError, RuntimeError) as exc:  # another model's optimiser: other groups or shapes
            raise CheckpointError(f"{state_path}: its {name} state does not fit this model ({one_line_reason(exc)})") from None
    if restore_rng:
        restore_rng_state(state["rng"])
    log.info("loaded checkpoint %s (step %d)", path, state["step"])
    return {"step": state["step"], **state["extra"]}
