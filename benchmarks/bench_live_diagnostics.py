"""The cost of the live diagnostics (``train.diagnostics``) against training's own, in one run.

Claim (issue 15): at the default frequency the live diagnostics add at most 5% to a run's training
time. The script trains a preset's model stage for ``--steps`` with ``train.diagnostics.every`` at
``--every`` (the image tokenizer of a two-stage preset is left untrained: its weights do not change
the cost), timing every call of the hook, and divides the hook's time by the rest of training's
time: both measured in the same process, so a machine shared with other jobs slows both alike and
the ratio holds. It then times the parts of one measurement on the trained model (best of
``--repeats``): the source passes with CKA and effective rank, the gradient conflict, the drawing.

    python benchmarks/bench_live_diagnostics.py --config tiny --every 10
    python benchmarks/bench_live_diagnostics.py --config default --steps 200 --every 100

Prints a table; the overhead of running at every N steps with S steps is measurements x seconds
per measurement / (S x seconds per step).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from polymodal.config import load_config
from polymodal.diagnostics.live import measure
from polymodal.diagnostics.live_hook import DRAWINGS, live_diagnostics
from polymodal.report.figures import rgb_array
from polymodal.training.loop import fit
from polymodal.training.probe import preserved_rng
from polymodal.training.run import prepare_run


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="a preset")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--every", type=int, default=100, help="train.diagnostics.every")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each part of a measurement")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_live_"))
    overrides = [f"run_dir={folder}", "train.progress=false", f"train.diagnostics.every={args.every}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_config([args.config], overrides)
    torch.manual_seed(config.seed)
    run = prepare_run(config, folder, resume=False)
    hook = live_diagnostics(run, config.train)
    spent = []

    def timed(model, step, logger):
        start = time.perf_counter()
        hook(model, step, logger)
        if hook.due(step):
            spent.append(time.perf_counter() - start)

    result = fit(run.model, run.splits.train, run.collator, config, folder, diagnose=timed)
    hook_seconds = sum(spent)
    train_seconds = result.wall_seconds - hook_seconds
    per_step = train_seconds / result.step
    parts = time_parts(hook, run.model, args.repeats)
    print(f"\n{args.config}: {result.step} steps of batch {config.train.batch_size} on {torch.get_num_threads()} threads; "
          f"probe {hook.batches[0].size} items, gradient conflict on {hook.batches[1].size}\n")  # fmt: skip
    print("| every | measurements | s / measurement | s / training step | training s | diagnostics s | overhead |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.every} | {len(spent)} | {hook_seconds / max(1, len(spent)):.2f} | {per_step:.3f} | {train_seconds:.1f} | "
          f"{hook_seconds:.1f} | {100 * hook_seconds / train_seconds:.1f}% |")  # fmt: skip
    print("\none measurement, by part (best of %d):\n" % args.repeats)
    print("| part | seconds | training steps |")
    print("| --- | ---: | ---: |")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.3f} | {seconds / per_step:.2f} |")


def time_parts(hook, model, repeats: int) -> dict[str, float]:
    """The parts of one measurement on the trained model, in eval mode as the hook runs them."""
    device = next(model.parameters()).device
    probe, conflict = (batch.to(device) for batch in hook.batches)
    model.eval()
    with preserved_rng():
        representations = best_time(lambda: measure(model, probe), repeats)
        both = best_time(lambda: measure(model, probe, conflict), repeats)
        record = measure(model, probe, conflict).record()
        drawing = best_time(lambda: [rgb_array(f) for draw in DRAWINGS.values() if (f := draw(record)) is not None], repeats)
    model.train()
    return {
        "source passes, CKA, effective rank (+ MoE, leakage)": representations,
        "gradient conflict": both - representations,
        "heatmaps for TensorBoard": drawing,
    }


if __name__ == "__main__":
    main()
