"""Write a run's report: one self-contained HTML page (works offline, fetches nothing) with its
losses and learning rate, its test figures against the preset's lines, its live diagnostics
(cross-modal CKA per layer, gradient conflict, expert usage, leakage, effective rank), its
samples and its config. Two runs are put side by side.

  polymodal report runs/default
  polymodal report runs/default runs/decoupled --out compare.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = "report.html"  # inside the (first) run folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by `polymodal train`")
    parser.add_argument("run_b", nargs="?", default=None, help="a second run folder, shown side by side")
    parser.add_argument("--out", default=None, help=f"the HTML file to write (default: RUN/{DEFAULT_OUT})")
    parser.add_argument("--lines", default=None, help="hold every run to this preset's lines (default: each run's own preset)")


def run(args: argparse.Namespace) -> int:
    from polymodal.report.build import write_report

    run_dirs = [args.run_dir] + ([args.run_b] if args.run_b else [])
    out = Path(args.out) if args.out else Path(args.run_dir) / DEFAULT_OUT
    path = write_report(run_dirs, out, lines=args.lines)
    print(f"wrote {path}; open it in a browser (file://{path.resolve()})")
    return 0
