"""A 2-rank training run for the kill-and-resume test, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_job.py RUN_DIR [--resume] [--delay S] [--fsdp]

The any-to-any run with gathered contrastive negatives (``ranks.train_run``), a checkpoint every 2
steps (sharded with ``--fsdp``); the delay slows the data only (it changes no number), so the test
can kill it mid-way.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
sys.path.insert(0, str(Path(__file__).parents[1]))  # batches.py
from ranks import train_run  # noqa: E402

from polymodal.distributed.process import process_group  # noqa: E402

STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")):
        kind = "fsdp" if args.fsdp else "contrastive"
        train_run(kind, args.run_dir, 16, STEPS, "train.ckpt_every=2", resume=args.resume, delay=args.delay)


if __name__ == "__main__":
    main()
