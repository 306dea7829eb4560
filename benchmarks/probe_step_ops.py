"""What a GPU would launch for one step of the main job: the ATen ops of collating one batch and of
one optimiser step of the ``default`` preset, and the calls that make the host wait for the device.

On a GPU every non-view ATen op is about one kernel launch, and a ``.item()`` (``_local_scalar_dense``)
or a data-dependent shape (``nonzero``, ``unique``) makes the host wait until the device has run
everything queued before it. A step of a small model is then bounded by the number of launches and
waits, not by its FLOPs (BENCHMARKS.md, "On a GPU"). The ops are counted on the CPU through a
``TorchDispatchMode`` (autograd's backward ops included), so this runs on any machine.

    python benchmarks/probe_step_ops.py                 # the default preset, fp32
    python benchmarks/probe_step_ops.py --set model.tasks=[audio_to_text]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import Worker  # noqa: E402  (builds the preset's data, model and optimiser as fit does)

# Ops that make no kernel: they only describe another tensor's memory.
VIEWS = {
    "view", "_unsafe_view", "expand", "transpose", "t", "permute", "unsqueeze", "squeeze", "slice", "select", "as_strided",
    "alias", "detach", "split", "split_with_sizes", "unbind", "chunk", "narrow", "reshape", "_reshape_alias", "lift_fresh",
    "view_as_real", "view_as_complex",
}  # fmt: skip
# Ops whose result the host must read before it can go on: a wait for the device when the tensor
# is on a GPU (collation's tensors stay on the CPU, where a read costs nothing).
WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "repeat_interleave"}


class OpCount(TorchDispatchMode):
    """Every ATen op dispatched inside the block, and where in polymodal each value was read on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.waits: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in WAITS:
            ours = [f for f in traceback.extract_stack() if "/polymodal/" in f.filename]
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
            self.waits[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def report(title: str, count: OpCount, rows: int) -> None:
    total = sum(count.ops.values())
    views = sum(n for name, n in count.ops.items() if name in VIEWS)
    print(f"\n{title}: {total} ATen ops, {total - views} of them not views; {sum(count.waits.values())} values read on the host")
    frequent = [f"{name} {n}" for name, n in count.ops.most_common() if name not in VIEWS][:rows]
    print("  most frequent ops (not views): " + ", ".join(frequent))
    for (name, where), n in count.waits.most_common(rows):
        print(f"  {n:5d} x {name:20s} at {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--set", action="append", default=[], help="a config override (model.tasks=[audio_to_text])")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    from polymodal.training.loop import optimizer_step
    from polymodal.training.sampler import Prefetcher

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as run_dir:
        worker = Worker(args.precision, 2, Path(run_dir), args.set)
        worker.block(2)  # past the first steps' one-off work (lazy buffers, kernel choice)
        collation, step = OpCount(), OpCount()
        with collation:
            pair = next(worker.pairs)
        with step:
            optimizer_step(worker.model, worker.state, Prefetcher(iter([pair]), depth=0), worker.config.train)
    print(f"default preset{' with ' + ' '.join(args.set) if args.set else ''}, {args.precision}, batch {worker.config.train.batch_size}")
    report("collation of one batch (CPU tensors, also when training on a GPU)", collation, args.rows)
    report("one optimiser step: forward, backward, clipping, AdamW", step, args.rows)


if __name__ == "__main__":
    main()
