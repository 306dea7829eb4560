"""Evaluate a trained run folder's latest checkpoint; print the figures and save eval.json.

  polymodal eval runs/default
  polymodal eval runs/default --split val
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by `polymodal train`")
    parser.add_argument("--split", default="test", choices=["val", "test"], help="which split to score (default: test)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many items per task")


def run(args: argparse.Namespace) -> int:
    from polymodal.errors import ConfigError
    from polymodal.evaluation.run import evaluate_run, flat_figures, write_eval
    from polymodal.training.run import load_run

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    run_dir = Path(args.run_dir)
    loaded = load_run(run_dir)
    figures = evaluate_run(loaded, split=args.split, limit=args.limit)
    path = write_eval(run_dir, figures, loaded.config)
    for key, value in flat_figures(figures).items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) and not value.is_integer() else f"{key:32s} {value:g}")
    for task, result in figures.items():
        for reference, generated in result.get("examples", [])[:3]:
            print(f"  {task}: {reference!r} -> {generated!r}")
    print(f"saved {path}")
    return 0
