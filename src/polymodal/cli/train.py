"""Train a model and evaluate it.

  polymodal train                                  # the default preset on the built-in data
  polymodal train --config tiny train.steps=50     # a preset plus key=value overrides
  polymodal train --config my.yaml                 # a YAML file over the default preset
  polymodal train run_dir=runs/x --resume          # continue an interrupted run exactly

Config merge order: defaults < preset < YAML files < key=value. See `polymodal configs`.
"""

from __future__ import annotations

import argparse

from polymodal.config import Config, load_config, load_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="PRESET|FILE",
        help="a shipped preset name or a YAML file; repeat to layer several (default: the 'default' preset)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run_dir from its latest checkpoint, with its saved config (key=value still applies)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def resolve(args: argparse.Namespace) -> Config:
    config = load_config(args.config, args.overrides)
    if not args.resume:
        return config
    # A resumed run keeps the config it started with; key=value (e.g. train.steps=3000) still applies.
    return load_run_config(config.run_dir, args.overrides)


def run(args: argparse.Namespace) -> int:
    from polymodal.training.job import train

    run_dir = train(resolve(args), resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0
