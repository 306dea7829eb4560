"""Write a run's weights as one whole model.safetensors, for inference in one process or elsewhere.

  polymodal export runs/default                     # -> runs/default/model.safetensors
  polymodal export runs/big --out big.safetensors   # an FSDP run's sharded checkpoint, gathered here
  polymodal export runs/default --checkpoint latest

The checkpoint is the one `eval` and `generate` use (the best with train.select, else the latest),
or the one --checkpoint names. An FSDP run's sharded checkpoint (one file per rank) is read whole in
this one process: no launcher, no process group. Reads no data.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder written by `polymodal train`")
    parser.add_argument("--out", metavar="FILE", help="where to write (default: RUN/model.safetensors)")
    parser.add_argument(
        "--checkpoint", default="auto", metavar="auto|best|latest", help="auto (default): the best with train.select, else the latest"
    )


def run(args: argparse.Namespace) -> int:
    from polymodal.training.export import export_run

    path = export_run(Path(args.run_dir), out=None if args.out is None else Path(args.out), checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return 0
