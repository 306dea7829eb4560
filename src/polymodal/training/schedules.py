"""Loss-weight schedules over the fraction of training done, and that fraction told to the model.

A model returns named, unweighted loss terms; the training loop weights them. ``train.loss_weights``
gives each name a constant weight (default 1); ``train.loss_schedules`` gives a name a
piecewise-linear weight over progress p = step / steps in [0, 1), as (progress, weight) points:

    loss_schedules:
      contrastive_image_text: [[0, 0], [0.3, 0], [0.6, 1]]  # off for 30%, ramped in by 60%
      hsic_private: [[0, 1], [0.5, 1], [1, 0.1]]            # independence early, relaxed late

Between two points the weight is interpolated linearly; before the first and after the last it
is the end point's weight. Points may share a progress (a step change): from that progress on,
the later point applies. A schedule MULTIPLIES the static weight, so ``loss_weights`` sets a term's
scale and the schedule its shape over time: effective = loss_weights.get(name, 1) * schedule(p).
This expresses the curricula of multi-stage training recipes (private branches first, the shared
bridge opened later; alignment early, independence late) without code.

Progress is a pure function of the optimiser step, so a resumed run sees the same weights at the
same step with nothing extra in the checkpoint. Any sub-module of the model that defines
``set_progress(fraction)`` is called with p before each optimiser step (a decoupler can gate a
shared bank by it); the same determinism makes that resume-exact.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

from torch import nn

from polymodal.errors import ConfigError

Point = tuple[float, float]  # (progress in [0, 1], weight >= 0)


def check_loss_schedules(schedules: Mapping[str, Sequence[Point]], where: str = "train.loss_schedules") -> None:
    """Raise a :class:`ConfigError` naming the first bad schedule: no points, a point that is not a
    (progress, weight) pair, a progress outside [0, 1], points out of order, a negative weight."""
    example = "e.g. [[0, 0], [0.3, 0], [0.6, 1]]"
    for name, points in schedules.items():
        key = f"{where}.{name}"
        if not isinstance(points, Sequence) or isinstance(points, str) or not points:
            raise ConfigError(f"{key}: expected a non-empty list of [progress, weight] points, {example}; got {points!r}")
        for i, point in enumerate(points):
            if not isinstance(point, Sequence) or isinstance(point, str) or len(point) != 2:
                raise ConfigError(f"{key}[{i}]: expected a [progress, weight] pair, {example}; got {point!r}")
            progress, weight = point
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point):
                raise ConfigError(f"{key}[{i}]: progress and weight must be finite numbers, got {list(point)!r}")
            if not 0 <= progress <= 1:
                raise ConfigError(f"{key}[{i}]: progress {progress} is outside [0, 1] (the fraction of train.steps done)")
            if weight < 0:
                raise ConfigError(f"{key}[{i}]: weight {weight} is negative; a loss weight must be >= 0")
            if i > 0 and progress < points[i - 1][0]:
                raise ConfigError(
                    f"{key}: points must be sorted by progress; {progress} follows {points[i - 1][0]} at [{i}]"
                )


def schedule_weight(points: Sequence[Point], progress: float) -> float:
    """The piecewise-linear weight of a checked schedule at ``progress``."""
    positions = [p for p, _ in points]
    right = bisect.bisect_right(positions, progress)  # points[right - 1] <= progress < points[right]
    if right == 0:
        return float(points[0][1])
    if right == len(points):
        return float(points[-1][1])
    (x0, y0), (x1, y1) = points[right - 1], points[right]
    return float(y0 + (y1 - y0) * (progress - x0) / (x1 - x0))  # x1 > x0: progress lies between them


def training_progress(step: int, steps: int) -> float:
    """The fraction of training done before optimiser step ``step + 1``: 0 at the first step."""
    return step / steps


def effective_loss_weights(
    static: Mapping[str, float], schedules: Mapping[str, Sequence[Point]], progress: float
) -> dict[str, float]:
    """Each named term's weight at ``progress``: its static weight (default 1) times its schedule
    (default 1). Names in neither mapping are absent; their weight is 1."""
    weights = {name: float(weight) for name, weight in static.items()}
    for name, points in schedules.items():
        weights[name] = weights.get(name, 1.0) * schedule_weight(points, progress)
    return weights


def set_model_progress(model: nn.Module, progress: float) -> None:
    """Call ``set_progress(progress)`` on every sub-module of ``model`` (itself included) that has it."""
    for module in model.modules():
        hook = getattr(module, "set_progress", None)
        if callable(hook):
            hook(progress)


def restore_progress(model: nn.Module, step: int | None, steps: int) -> None:
    """Put a model whose weights come from the checkpoint of ``step`` back at the point of training
    they were last trained at (that of their last step): a decoupler's opening gate follows
    progress and is not a weight (closed, typed slots' shared slots would read nothing). Weights
    that record no step are taken as fully trained."""
    set_model_progress(model, 1.0 if step is None else training_progress(max(step - 1, 0), steps))
