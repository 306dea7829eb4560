"""The default preset's training step with each decoupling module, against the same step without.

Claim (issue 13): a decoupler or the modality-aware mixture of experts, added by one config line,
costs at most 1.3x the default preset's step (forward + backward + AdamW on one real batch of 64).
Every variant is built from the `default` preset on the built-in data with the same seed; the
timed steps of all variants are interleaved round-robin, so they run under the same machine load,
and the median per variant is compared with the plain preset's. Each variant's forward + backward
FLOPs (torch's counter: matmuls, convolutions, attention) are counted on one more step, a ratio
that no machine load can bend; ``--flops-only`` prints those alone.

    python benchmarks/bench_decoupling_step.py                 # 2 warm-up + 8 timed steps each
    python benchmarks/bench_decoupling_step.py --steps 4 --threads 1
    python benchmarks/bench_decoupling_step.py --flops-only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from polymodal.config import load_config
from polymodal.training.mfu import counting
from polymodal.training.optim import build_optimizer
from polymodal.training.run import prepare_run

MOE = "{layers: [1, 3], num_shared_experts: 2, num_private_experts: 1, top_k: 2, capacity_factor: 1.25}"
VARIANTS = {
    "default (none)": [],
    "query_bank": ["model.decoupler={name: query_bank}"],
    "typed_slots": ["model.decoupler={name: typed_slots}"],
    "shared_private": ["model.decoupler={name: shared_private}"],
    "modality MoE (layers 1, 3)": [f"model.backbone.moe={MOE}"],
}


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    start = time.perf_counter()
    loss = sum(model(batch).losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _flops(model: torch.nn.Module, batch) -> int:
    """Forward + backward FLOPs of one step (no optimizer update: elementwise, not counted)."""
    with counting() as count:
        sum(model(batch).losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return count.total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, time nothing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, overrides in VARIANTS.items():
            config = load_config(["default"], [f"run_dir={Path(folder) / str(len(setups))}", *overrides])
            torch.manual_seed(config.seed)
            run = prepare_run(config, Path(config.run_dir), resume=False)
            run.model.train()
            for module in run.model.modules():  # the shared branches open, as after 60% of training
                if module is not run.model and hasattr(module, "set_progress"):
                    module.set_progress(1.0)
            loader = DataLoader(run.splits.train, batch_size=config.train.batch_size, shuffle=False, collate_fn=run.collator)
            setups[name] = (run.model, build_optimizer(run.model, config.train), next(iter(loader)))
    flops = {name: _flops(model, batch) for name, (model, _, batch) in setups.items()}
    times = {name: [] for name in setups}
    for round_ in range(0 if args.flops_only else args.warmup + args.steps):
        for name, (model, optimizer, batch) in setups.items():
            seconds = _step(model, optimizer, batch)
            if round_ >= args.warmup:
                times[name].append(seconds)
    if args.flops_only:
        print("default preset, batch 64: forward + backward FLOPs of one step")
    else:
        print(f"default preset, batch 64, {args.threads} thread(s), median of {args.steps} interleaved steps")
    print("| variant | step ms | ratio to the preset | GFLOP | FLOP ratio | parameters (M) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(times["default (none)"]) if not args.flops_only else None
    for name, (model, _, _) in setups.items():
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        timing = "- | -"
        if base is not None:
            median = statistics.median(times[name])
            timing = f"{1000 * median:.0f} | {median / base:.2f}x"
        ratio = flops[name] / flops["default (none)"]
        print(f"| {name} | {timing} | {flops[name] / 1e9:.1f} | {ratio:.2f}x | {params:.2f} |")


if __name__ == "__main__":
    main()
