"""How far a preset's training step is from its FLOPs: the FLOPs of one step by kind of op (matrix
products, convolutions, attention kernels), the step's time in those ops and in everything else
(``torch.profiler``, self CPU time), and what the preset's ``train.steps`` would take if only those
ops ran, at their rate inside the step and at this machine's matmul peak.

Issue 18 asks the ``metaquery`` preset for at most 20 minutes on 2 cores, data, training and
evaluation included; issue 19 asks the step to spend its time on the model. The time of the
FLOP-carrying ops is a floor that no saving elsewhere in the step lowers: only fewer FLOPs, or
faster kernels, go under it.

    python benchmarks/probe_step_budget.py --config metaquery
    python benchmarks/probe_step_budget.py --config metaquery --set model.task_fractions.text_to_audio=0.5
    python benchmarks/probe_step_budget.py                       # the default preset

The step is ``bench_train_step.py``'s: the preset's data (cached under ``$POLYMODAL_CACHE``) and
model, an untrained image tokenizer standing in for stage 1 (the step's work does not depend on its
weights), blocks compiled where the preset says ``train.compile``. FLOPs are counted by
``FlopCounterMode`` (compiled blocks included) and averaged over a few steps, whose padding differs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import Worker  # noqa: E402  (builds the preset's data, model and optimiser as fit does)

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
OTHER = "everything else"
KINDS = ("matrix products", "convolutions", "attention kernels", OTHER)


def kind(op: str) -> str:
    """The kind of an op named as the profiler (``aten::mm``) or the FLOP counter (``aten.mm``) names it."""
    base = op.split("::")[-1].split(".")[-1]
    if base in MATMULS:
        return "matrix products"
    if "convolution" in base:
        return "convolutions"
    if base.startswith("_scaled_dot_product"):
        return "attention kernels"
    return OTHER


def flops_by_kind(worker: Worker, steps: int) -> dict[str, float]:
    """Mean FLOPs per step of each kind over ``steps`` steps."""
    from torch.utils.flop_counter import FlopCounterMode

    total: dict[str, float] = defaultdict(float)
    for _ in range(steps):
        mode = FlopCounterMode(display=False)
        with mode:
            worker.block(1)
        for op, count in mode.get_flop_counts()["Global"].items():
            total[kind(str(op))] += count / steps
    return total


def seconds_by_kind(worker: Worker, steps: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Self CPU seconds per step of each kind, profiled over ``steps`` steps (every thread's ops),
    and the ops of ``OTHER`` as (name, seconds per step, calls per step), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        worker.block(steps)
    total: dict[str, float] = defaultdict(float)
    other = []
    for event in prof.key_averages():
        seconds, which = event.self_cpu_time_total / 1e6 / steps, kind(event.key)
        total[which] += seconds
        if which == OTHER:
            other.append((event.key, seconds, event.count // steps))
    return total, sorted(other, key=lambda row: -row[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="default", help="a preset or YAML file (default: the default preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=6, help="steps before any measurement (compilation happens here)")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks of --block-steps steps; the median counts")
    parser.add_argument("--block-steps", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--flop-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=0, help="also list the N largest ops of everything else")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as run_dir:
        worker = Worker(args.precision, args.threads, Path(run_dir), args.set, configs=[args.config])
        train = worker.config.train
        dtype = worker.dtype or worker.torch.float32
        peak = worker.peak(str(dtype).removeprefix("torch."))
        worker.block(args.warmup)
        step = statistics.median(worker.block(args.block_steps) / args.block_steps for _ in range(args.blocks))
        flops = flops_by_kind(worker, args.flop_steps)
        seconds, others = seconds_by_kind(worker, args.profile_steps)

    profiled = sum(seconds.values())
    print(f"preset {args.config} {' '.join(args.set)}: {dtype}, compiled blocks: {train.compile}, batch {train.batch_size}")
    print(f"step {step * 1e3:.0f} ms (median of {args.blocks} blocks of {args.block_steps}); profiled {profiled * 1e3:.0f} ms of self CPU a step")
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    print("| ops | GFLOP/step | ms/step (self CPU) | share | GFLOP/s in the step | of the peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in KINDS:
        gflop, ms = flops.get(name, 0.0) / 1e9, seconds.get(name, 0.0) * 1e3
        if not (gflop or ms):
            continue
        rate = f"{gflop / ms * 1e3:.0f} | {gflop / ms * 1e3 / (peak / 1e9):.0%}" if gflop and ms else "|"
        print(f"| {name} | {gflop:.2f} | {ms:.0f} | {ms / 1e3 / profiled:.0%} | {rate} |")
    total_flops = sum(flops.values())
    carrying = sum(seconds.get(name, 0.0) for name in KINDS if name != OTHER)
    print(f"| all | {total_flops / 1e9:.2f} | {profiled * 1e3:.0f} | 100% | {total_flops / step / 1e9:.0f} (over the step) | MFU {total_flops / step / peak:.0%} |")
    minutes = train.steps / 60
    print(f"\ntrain.steps={train.steps}: {step * minutes:.1f} min at this step; {carrying * minutes:.1f} min if only the FLOP-carrying ops "
          f"ran at their in-step rate; {total_flops / peak * minutes:.1f} min at the matmul peak")  # fmt: skip
    if args.top:
        print(f"\nthe largest ops of {OTHER}:\n| op | ms/step | calls/step |\n| --- | ---: | ---: |")
        for name, seconds_per_step, calls in others[: args.top]:
            print(f"| `{name[:70]}` | {seconds_per_step * 1e3:.1f} | {calls} |")


if __name__ == "__main__":
    main()
