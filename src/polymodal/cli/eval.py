"""Evaluate a trained run folder; print the figures and save them.

  polymodal eval runs/default
  polymodal eval runs/default --split val
  polymodal eval runs/speech --manifest test.jsonl --by speaker

A run trained with ``train.select`` is evaluated with its best checkpoint (``checkpoints/best``),
any other with its latest. With ``--manifest``, the run scores any JSONL manifest (label accuracy
through the generated caption, or zero-shot against the label texts for a CLIP run), broken down
by each ``--by`` field of its lines; the figures go to ``eval_<manifest name>.json`` in the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by `polymodal train`")
    parser.add_argument("--split", default="test", choices=["val", "test"], help="which split to score (default: test)")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many items per task")
    parser.add_argument("--manifest", help="score this JSONL manifest instead of a split of the run's data")
    parser.add_argument(
        "--by", action="append", default=[], metavar="FIELD", help="with --manifest: break figures down by this field of the lines (repeatable)"
    )


def run(args: argparse.Namespace) -> int:
    from polymodal.errors import ConfigError
    from polymodal.evaluation.run import evaluate_run, flat_figures, write_eval
    from polymodal.training.run import load_run

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    run_dir = Path(args.run_dir)
    if args.by and not args.manifest:
        raise ConfigError("--by breaks down a manifest's figures; give --manifest too")
    loaded = load_run(run_dir)
    if args.manifest:
        return _manifest(loaded, args)
    figures = evaluate_run(loaded, split=args.split, limit=args.limit)
    path = write_eval(run_dir, figures, loaded.config)
    for key, value in flat_figures(figures).items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) and not value.is_integer() else f"{key:32s} {value:g}")
    for task, result in figures.items():
        for reference, generated in result.get("examples", [])[:3]:
            print(f"  {task}: {reference!r} -> {generated!r}")
    print(f"saved {path}")
    return 0


def _manifest(loaded, args: argparse.Namespace) -> int:
    from polymodal.evaluation.manifest import evaluate_manifest, format_table

    figures = evaluate_manifest(loaded, args.manifest, by=args.by, limit=args.limit)
    for line in format_table(figures):
        print(line)
    path = Path(args.run_dir) / f"eval_{Path(args.manifest).stem}.json"
    path.write_text(json.dumps({"manifest": str(args.manifest), "checkpoint": loaded.checkpoint, "figures": figures}, indent=2))
    print(f"saved {path}")
    return 0
