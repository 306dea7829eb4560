"""Train a model and evaluate it.

  polymodal train                                  # the default preset on the built-in data
  polymodal train --config tiny train.steps=50     # a preset plus key=value overrides
  polymodal train --config my.yaml                 # a YAML file over the default preset
  polymodal train run_dir=runs/x --resume          # continue an interrupted run exactly
  polymodal train --nproc-per-node 2 --config tiny # data-parallel: 2 ranks (torchrun -m polymodal train ... too)

Config merge order: defaults < preset < YAML files < key=value. See `polymodal configs`.
"""

from __future__ import annotations

import argparse

from polymodal.config import Config, load_config, load_run_config
from polymodal.distributed import launch
from polymodal.overrides import parse_override


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
    launch.add_launch_arguments(parser)


def resolve(args: argparse.Namespace) -> Config:
    if not args.resume:
        return load_config(args.config, args.overrides)
    # A resumed run keeps the config it started with; key=value (e.g. train.steps=3000) still applies,
    # checked against that config: against the presets, a setting of the run's own head would be refused.
    run_dir = load_config(args.config, [item for item in args.overrides if "run_dir" in parse_override(item)]).run_dir
    return load_run_config(run_dir, args.overrides)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """This command line as each rank runs it: the same config, without the launcher options."""
    argv = ["-v"] if args.verbose else []
    argv.append("train")
    for name in args.config:
        argv += ["--config", name]
    return [*argv, *(["--resume"] if args.resume else []), *args.overrides]


def run(args: argparse.Namespace) -> int:
    from polymodal.distributed.process import is_main, process_group, resolve_device
    from polymodal.training.job import train

    if launch.requested(args):
        return launch.relaunch(args, worker_argv(args))
    config = resolve(args)
    with process_group(resolve_device(config.device)):  # one rank of a launched run; else a plain process
        run_dir = train(config, resume=args.resume)
        main = is_main()
    if main:
        print(f"run folder: {run_dir}")
    return 0
