"""Training metrics to ``run_dir/metrics.jsonl`` (one JSON object per event) and TensorBoard scalars.

Each line of ``metrics.jsonl`` is flat: ``{"step": 10, "split": "train", "time": 1719.3, "loss": 2.1,
"lr": 0.001, ...}`` with ``time`` in Unix seconds. TensorBoard tags are ``{split}/{name}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "split", "time")


def truncate_after(path: Path, step: int) -> int:
    """Drop the entries of ``path`` logged after ``step`` (and a torn last line). Returns how many."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            dropped += 1
            continue
        if entry.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard, images to TensorBoard.

    Args:
        run_dir: the run folder (created if needed).
        resume_step: None for a fresh run: an old ``metrics.jsonl`` is replaced and old TensorBoard
            events are hidden. Otherwise the step training resumes from: entries logged after it by
            the earlier (killed) process are removed from ``metrics.jsonl`` and purged from
            TensorBoard, so every step is logged once.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            dropped = truncate_after(self.path, resume_step)
            if dropped:
                log.info("removed %d entries after step %d from %s", dropped, resume_step, self.path)
        # Line-buffered: every event is on disk before the next step, even if the process is killed.
        self._file = open(self.path, "a", buffering=1)
        purge_step = 0 if resume_step is None else resume_step + 1  # TensorBoard hides events >= it
        self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """Record scalar ``values`` at ``step`` under split ``prefix`` (``train``, ``val`` ...)."""
        clash = [name for name in values if name in RESERVED_KEYS]
        if clash:
            raise ValueError(
                f"metric name {clash[0]!r} is reserved in {METRICS_FILE}; rename it "
                f"(reserved: {', '.join(RESERVED_KEYS)})"
            )
        entry: dict[str, Any] = {"step": step, "split": prefix, "time": round(time.time(), 3)}
        for name, value in values.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            entry[name] = value if math.isfinite(value) else str(value)  # JSON has no NaN/inf
            self._writer.add_scalar(f"{prefix}/{name}", value, step)
        self._file.write(json.dumps(entry) + "\n")

    def log_image(self, tag: str, image_hwc_uint8: np.ndarray | torch.Tensor, step: int) -> None:
        """Record an image to TensorBoard.

        Args:
            tag: e.g. ``val/reconstruction``.
            image_hwc_uint8: (H, W, C) uint8 with C in {1, 3, 4}.
            step: the training step.
        """
        image = torch.as_tensor(image_hwc_uint8)
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"log_image({tag!r}): expected an (H, W, C) uint8 image with C in 1, 3, 4; "
                f"got {tuple(image.shape)} {image.dtype}. Convert with (x.clamp(0, 1) * 255).byte()"
            )
        self._writer.add_image(tag, image.numpy(), step, dataformats="HWC")

    def flush(self) -> None:
        self._file.flush()
        self._writer.flush()

    def close(self) -> None:
        self._file.close()
        self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullMetricsLogger(MetricsLogger):
    """What ranks other than 0 of a data-parallel run log to: nothing (rank 0 writes the run folder)."""

    def __init__(self) -> None:  # no folder, no files
        pass

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        pass

    def log_image(self, tag: str, image_hwc_uint8: np.ndarray | torch.Tensor, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
