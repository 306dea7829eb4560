"""The figures of a run (curves, heatmaps, small multiples), drawn with matplotlib to PNG bytes
for the HTML report or to an (H, W, 3) uint8 array for TensorBoard's images.

Why matplotlib and not plotly: TensorBoard takes heatmaps as pixels, so the live diagnostics need
a rasteriser anyway, and one renderer draws the same heatmap in TensorBoard and in the report. The
report then carries PNGs of a few tens of kB each instead of the 3.5 MB plotly.js bundle per file,
opens at once, and holds no script at all: nothing to fail in a browser, nothing that could fetch.
Interactivity (hover, zoom) is what it gives up; every panel states its values' range instead.

Figures are made on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no
global state or GUI backend is touched (training may draw in a process that has a display).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
PANEL_SIZE = (4.6, 3.0)  # inches per curve panel
HEATMAP_INCHES_PER_ROW = 0.32  # a row label stays readable at 100 dpi
HEATMAP_MIN_INCHES = 3.2
ANNOTATE_UP_TO = 10  # cells get their value written when the matrix is at most this wide
SIMILARITY_COLORS = "viridis"  # CKA, shares: 0 dark, 1 bright
SIGNED_COLORS = "RdBu"  # cosines: negative red, positive blue, 0 white
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in perceived brightness


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of a curve panel: x (steps) and y, with a label; ``dashed`` for a target line."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    dashed: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
    """One set of axes of curves.

    Attributes:
        title: above the axes.
        series: the lines.
        log_y: a log-scaled y axis (losses); non-positive values are left out.
        y_range: fixed (low, high) limits, e.g. the same for two runs compared side by side.
        y_label: the y axis' label.
    """

    title: str
    series: Sequence[Series]
    log_y: bool = False
    y_range: tuple[float, float] | None = None
    y_label: str = ""


def curves_figure(panels: Sequence[Panel], *, columns: int = 1) -> Figure:
    """Curve panels on a grid of ``columns``, x axis "step"."""
    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    for index, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, index + 1)
        for series in panel.series:
            x, y = np.asarray(series.x, dtype=float), np.asarray(series.y, dtype=float)
            shown = np.isfinite(y) & ((y > 0) if panel.log_y else True)
            style = {"linestyle": "--", "linewidth": 1.0, "color": "0.35"} if series.dashed else {"linewidth": 1.4}
            ax.plot(x[shown], y[shown], label=series.label, **style)
        if panel.log_y:
            ax.set_yscale("log")
        if panel.y_range is not None:
            ax.set_ylim(*panel.y_range)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(panel.y_label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(fontsize=6, loc="best", ncol=2 if len(panel.series) > 6 else 1)
    return fig


def heatmap_figure(
    matrices: Sequence[tuple[str, np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    colors: str = SIMILARITY_COLORS,
    per_row: int | None = None,
) -> Figure:
    """One heatmap per (title, matrix), on one colour scale (a matrix over time).

    Args:
        matrices: (title, (R, C) values); NaN cells are drawn blank.
        row_labels, col_labels: R and C tick labels.
        value_range: the colour scale's (low, high), shared by every panel.
        colors: a matplotlib colormap name.
        per_row: heatmaps per row (default: all in one row).
    """
    rows, cols = len(row_labels), len(col_labels)
    per_row = min(per_row or len(matrices), len(matrices))
    grid_rows = math.ceil(len(matrices) / per_row)
    side = max(HEATMAP_MIN_INCHES, HEATMAP_INCHES_PER_ROW * max(rows, cols) + 1.2)
    fig = Figure(figsize=(side * per_row + 0.8, side * grid_rows), dpi=DPI, layout="constrained")
    grid = fig.subplots(grid_rows, per_row, squeeze=False).flatten()
    for unused in grid[len(matrices) :]:
        unused.set_axis_off()
    axes = grid[: len(matrices)]
    image = None
    for ax, (title, matrix) in zip(axes, matrices):
        values = np.asarray(matrix, dtype=float)
        image = ax.imshow(values, vmin=value_range[0], vmax=value_range[1], cmap=colors, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(cols), col_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(rows), row_labels, fontsize=7)
        if max(rows, cols) <= ANNOTATE_UP_TO:
            for (r, c), value in np.ndenumerate(values):
                if np.isfinite(value):
                    red, green, blue, _ = image.cmap(image.norm(value))
                    light = LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue > 0.5  # dark text on light cells
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color="black" if light else "white")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG file bytes."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def rgb_array(fig: Figure) -> np.ndarray:
    """The figure as (H, W, 3) uint8 pixels (what ``MetricsLogger.log_image`` takes)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 4) -> (H, W, 3)
