"""``write_report``: one or two run folders -> one self-contained HTML page (``html.py``)."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path

from polymodal.errors import ConfigError
from polymodal.report.html import render_page
from polymodal.report.lines import LINES, preset_of
from polymodal.report.runs import read_run
from polymodal.report.sections import build_sections

log = logging.getLogger(__name__)

MAX_RUNS = 2  # side by side; more columns would not fit a page


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, lines: str | None = None) -> Path:
    """Read the runs and write their report to ``out``.

    Args:
        run_dirs: one run folder, or two to compare side by side.
        out: the HTML file to write (its folder is created).
        lines: the preset whose lines every run is held to; None: each run's own preset's.

    Returns:
        ``out``.
    """
    if not 1 <= len(run_dirs) <= MAX_RUNS:
        raise ConfigError(f"give one run folder, or two to compare; got {len(run_dirs)}")
    if lines is not None and lines not in LINES:
        raise ConfigError(f"--lines {lines!r}: no lines for that preset; presets with lines: {', '.join(LINES)}")
    paths = [Path(p) for p in run_dirs]
    same_name = len({p.name for p in paths}) < len(paths)
    runs = [read_run(p, name=str(p) if same_name else p.name) for p in paths]
    presets = [lines or preset_of(run.config) for run in runs]
    title = "polymodal run report: " + " vs ".join(run.name for run in runs)
    generated = f"written {datetime.datetime.now().isoformat(timespec='seconds')} from {', '.join(str(p) for p in paths)}"
    page = render_page(title, [run.name for run in runs], build_sections(runs, presets), generated=generated)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out
