"""The non-finite guard: a step whose loss or gradient is NaN or infinite updates nothing.

A NaN reaches the weights through one update and from there every later step; a single bad batch or
an overflow should not end a run that way. The step's update is skipped instead, as
``torch.amp.GradScaler`` skips fp16 overflow steps (Micikevicius et al. 2018, Mixed Precision
Training, arXiv:1710.03740): the optimiser's moments and step count stay as they are. The skipped
step still counts towards ``train.steps`` and the learning-rate schedule advances past it, so step
numbers, the schedule and the data position are those of a run without skips and exact resume needs
nothing new; a run with skips makes that many fewer updates (``skipped_steps`` in ``metrics.jsonl``).

After ``train.max_nonfinite_steps`` skips in a row the run stops with a :class:`RunError`: the
model has stopped learning and something (the learning rate, the data, the precision) must change.
Nothing is written then; and no checkpoint is ever written from weights that are not finite.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from polymodal.errors import RunError
from polymodal.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

MAX_NAMES = 3  # parameters named in a message; the rest are counted
ADVICE = "lower train.lr, check the data, or set train.precision=fp32"


def _non_finite_parameters(model: nn.Module, *, grads: bool) -> list[str]:
    """Names of the parameters whose gradient (or value) holds a NaN or an infinity."""
    names = []
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            names.append(name)
    return names


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else ""
    return ", ".join(names[:MAX_NAMES]) + more


@dataclasses.dataclass
class NonFiniteGuard:
    """Decides, step by step, whether an update may happen, and counts the steps it skipped.

    Attributes:
        max_consecutive: skips in a row after which the run stops (``train.max_nonfinite_steps``).
        run_dir: the run folder, whose last checkpoint the stop message names.
        skipped: steps skipped so far in the run (kept in checkpoints).
        consecutive: skips since the last update (kept in checkpoints).
    """

    max_consecutive: int
    run_dir: Path
    skipped: int = 0
    consecutive: int = 0

    def allows_update(self, losses: Mapping[str, float], grad_norm: float, *, step: int, model: nn.Module) -> bool:
        """True when ``losses`` (``loss`` the weighted total, and each term) and the gradient norm
        are finite. Otherwise the skip is counted and logged with its cause, and False returned.

        Raises:
            RunError: this is the ``max_consecutive``-th skip in a row.
        """
        if math.isfinite(grad_norm) and all(math.isfinite(value) for value in losses.values()):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        cause = self._cause(losses, grad_norm, model)
        log.warning("step %d skipped, no update: %s (%d skipped in this run)", step, cause, self.skipped)
        if self.consecutive >= self.max_consecutive:
            last = latest_checkpoint(self.run_dir)
            kept = f"the last checkpoint, {last}, is intact" if last is not None else "no checkpoint was written"
            raise RunError(
                f"steps {step - self.consecutive + 1}-{step}: {self.consecutive} in a row with a non-finite loss "
                f"or gradient (train.max_nonfinite_steps={self.max_consecutive}; last: {cause}); stopped, "
                f"{kept}; {ADVICE}, then continue with --resume"
            )
        return False

    @staticmethod
    def _cause(losses: Mapping[str, float], grad_norm: float, model: nn.Module) -> str:
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if list(losses) == ["loss"]:  # no term at all: accumulate_gradients saw only empty batches
            return "no sample of the step's batches could be loaded (skipped_samples counts them)"
        if bad:
            terms = ", ".join(f"{name}={value}" for name, value in bad.items() if name != "loss")
            return f"non-finite loss {terms or 'loss=' + str(bad['loss']) + ' (the weighted sum of finite terms)'}"
        return f"non-finite gradient (norm {grad_norm}) in {_listed(_non_finite_parameters(model, grads=True))}"

    def check_weights(self, model: nn.Module, *, step: int) -> None:
        """Raise rather than let weights that are not finite be written to a checkpoint."""
        names = _non_finite_parameters(model, grads=False)
        if names:
            raise RunError(
                f"step {step}: the weights are not finite ({_listed(names)}), so no checkpoint was written; the "
                f"last one, {latest_checkpoint(self.run_dir)}, is intact; {ADVICE}, then continue with --resume"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped, "consecutive_skips": self.consecutive}

    def load_state_dict(self, saved: Mapping[str, int]) -> None:
        """Counters from a checkpoint's extra state (absent in checkpoints older than the guard: 0)."""
        self.skipped = int(saved.get("skipped_steps", 0))
        self.consecutive = int(saved.get("consecutive_skips", 0))
