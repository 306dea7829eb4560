"""List the presets shipped inside the package, or print one.

  polymodal configs            # name and purpose of each preset
  polymodal configs default    # the preset's YAML
"""

from __future__ import annotations

import argparse

from polymodal.config import preset_names, preset_summary, preset_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="a preset to print in full")


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(preset_text(args.name), end="")
        return 0
    names = preset_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {preset_summary(name)}")
    return 0
