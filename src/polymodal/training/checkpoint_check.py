"""Which checkpoint ``--resume`` starts from: the newest one whose files are whole.

A checkpoint can be damaged after it was written (a disk fault, a copy cut short, a file edited by
hand); its atomic write cannot prevent that. Before resuming, each candidate, newest first, is
checked: ``model.safetensors`` must be exactly as long as its header says (8-byte header length,
JSON header, then the tensors' bytes) and pass safetensors' own header checks, and ``state.pt`` must
load with ``torch.load(weights_only=True)`` into a training state. A damaged one is moved aside to
``checkpoints/damaged-<name>`` (kept for a look, never read again) with a warning naming the file
and the fault, and the next one is tried. The check reads every file once; bit flips inside the
tensor data, which no header records, are not detected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from pathlib import Path

import safetensors

from polymodal.training.checkpoint import (
    CHECKPOINT_DIR,
    LATEST_FILE,
    MODEL_FILE,
    SHARDED_DIR,
    STATE_FILE,
    CheckpointError,
    has_weights,
    latest_checkpoint,
    one_line_reason,
    point_latest,
    read_state,
)

log = logging.getLogger(__name__)

DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint moved aside keeps this prefix
_HEADER_LENGTH = struct.Struct("<Q")  # safetensors: an 8-byte little-endian header length, JSON header, data


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (its size disagrees with its header), or None."""
    size = path.stat().st_size
    if size < _HEADER_LENGTH.size:
        return f"{path} is {size} bytes, too short for a safetensors file"
    with open(path, "rb") as handle:
        (header_length,) = _HEADER_LENGTH.unpack(handle.read(_HEADER_LENGTH.size))
        if header_length > size - _HEADER_LENGTH.size:
            return f"{path} is truncated: {size} bytes, but its header alone says {header_length}"
        try:
            header = json.loads(handle.read(header_length))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # not JSON, or not the layout
            return f"{path} has a corrupt safetensors header"
    expected = _HEADER_LENGTH.size + header_length + max(ends, default=0)
    if size != expected:
        return f"{path} is {size} bytes where its header says {expected}: truncated or corrupt"
    try:
        with safetensors.safe_open(str(path), framework="pt"):  # the library's own checks of the header
            pass
    except (safetensors.SafetensorError, OSError) as exc:
        return f"{path} is corrupt ({one_line_reason(exc)})"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing, truncated or corrupt file), or None.
    An FSDP checkpoint's shards (``sharded/``) are checked by the checkpoint library as it loads them."""
    if (folder / SHARDED_DIR).is_dir():
        if not has_weights(folder):
            return f"{folder / SHARDED_DIR} has no .metadata: its write did not finish"
        return _state_problem(folder / STATE_FILE)
    for name in (MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            return f"{folder / name} is missing"
    problem = _safetensors_problem(folder / MODEL_FILE)
    if problem is not None:
        return problem
    return _state_problem(folder / STATE_FILE)


def _state_problem(path: Path) -> str | None:
    """Why ``state.pt`` is not a whole training state, or None."""
    if not path.is_file():
        return f"{path} is missing"
    try:
        read_state(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run whose files are whole, or None when it has none.

    Each damaged newer checkpoint is moved aside to ``checkpoints/damaged-<name>`` (kept for a look,
    never read again) with a warning naming the file and the fault.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    moved = False
    while (found := latest_checkpoint(run_dir)) is not None:
        problem = checkpoint_problem(found)
        if problem is None:
            if moved:
                with contextlib.suppress(OSError):  # unwritable: latest_checkpoint falls back on its own
                    point_latest(ckpt_dir, found.name)
            return found
        aside = ckpt_dir / f"{DAMAGED_PREFIX}{found.name}"
        number = 1
        while aside.exists():  # damaged twice at the same step: keep both
            aside, number = ckpt_dir / f"{DAMAGED_PREFIX}{found.name}.{number}", number + 1
        try:
            os.replace(found, aside)
        except OSError as exc:
            raise CheckpointError(f"{problem}; it cannot be moved aside ({exc}): remove {found} to resume") from None
        moved = True
        with contextlib.suppress(OSError):  # `latest` named it; the next whole one is named below
            (ckpt_dir / LATEST_FILE).unlink()
        log.warning("%s; moved %s to %s, resuming from the newest whole checkpoint instead", problem, found, aside)
    return None
