"""Build (or load from its cache) a config's dataset, print its statistics and how long it took, and
write a preview a person can look at and listen to (a PNG grid of samples, a few WAVs).

  polymodal data                                       # the default preset's data (the built-in set)
  polymodal data data.options.num_samples=2000 --out data_preview
  polymodal data data.source=manifest data.manifest=my.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", action="append", default=[], metavar="PRESET|FILE", help="a preset or YAML file (default: 'default')"
    )
    parser.add_argument("--out", default="data_preview", help="folder for the preview (default: data_preview)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.options.num_samples=2000")


def run(args: argparse.Namespace) -> int:
    from polymodal.config import load_config
    from polymodal.datasets.base import build_source

    config = load_config(args.config, args.overrides)
    source = build_source(config.data, config.seed)
    start = time.perf_counter()
    splits = source.load()
    print(source.describe(splits))
    print(f"{config.data.source}: ready in {time.perf_counter() - start:.1f} s")
    written = source.write_preview(splits, Path(args.out))
    print(f"wrote {len(written)} files to {args.out}/")
    return 0
