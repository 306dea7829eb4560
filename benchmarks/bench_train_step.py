"""Training throughput of the main job (issue 19): the ``default`` preset's optimiser step (data +
forward + backward + AdamW) now against commit c4f5646, the step's MFU, and bf16 MFU on the shapes
of ``bench_backbone.py``.

Claim: the default preset's step is at least 1.8x faster than at c4f5646. Both versions run in one
invocation, each in its own worker process importing its own source tree; the parent alternates
blocks of steps between them, so load from other processes on shared cores hits both alike. A block
starts the step loop afresh (the new loop's prefetch thread starts empty and is stopped before the
other worker's block), so collation done ahead never overlaps the other side's timing.

    git worktree add /tmp/wt-c4f5646 c4f5646
    python benchmarks/bench_train_step.py --old /tmp/wt-c4f5646
    python benchmarks/bench_train_step.py --old /tmp/wt-c4f5646 --profile 3      # + op profiles
    python benchmarks/bench_train_step.py --skip-steps --backbone                 # bf16 MFU only
    python benchmarks/bench_train_step.py --old /tmp/wt-c4f5646 --set train.compile=true --warmup 6   # compiled blocks
    python benchmarks/bench_train_step.py --old /tmp/wt-c4f5646 --warm-cache    # the steps of the second epoch on
    python benchmarks/bench_train_step.py --old this --set train.compile=true --warm-cache --warmup 12 --blocks 10  # compiled vs eager

``--old this`` makes the "old" side this tree without the ``--set`` overrides (and with the same
``--warm-cache``), to time one setting against the preset as it is.

The new version reads the training split as ``fit`` does (keyed items), so its collator keeps each
clip's log-mel frames: the timed steps are those of the first epoch, every clip new, unless
``--warm-cache`` first collates one whole epoch (the main job's 1,200 steps are 4.8 epochs).

Each worker builds the preset's data (cached under ``$POLYMODAL_CACHE`` after the first time) and
model (an untrained image tokenizer stands in for stage 1: the step's work does not depend on its
weights). MFU = FLOPs of one step counted by ``FlopCounterMode`` / step time / the best
``F.linear`` FLOP/s measured in the worker for the step's precision (``polymodal.training.mfu``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parent / "src"
TOP_OPS = 15  # rows of each profile table


# ----------------------------------------------------------------------------- worker (either version)


class Worker:
    """One version's training step of the ``default`` preset (or of ``configs``), driven by the parent
    over stdin/stdout."""

    def __init__(
        self, precision: str, threads: int, run_dir: Path, overrides: list[str], warm_cache: bool = False, configs: list[str] = ()
    ) -> None:
        """``configs``: presets or YAML files under the overrides (none: the ``default`` preset)."""
        import torch

        from polymodal.config import load_config

        torch.set_num_threads(threads)
        self.torch = torch
        base = [f"train.precision={precision}", f"run_dir={run_dir}", "train.progress=false"]
        self.config = load_config(list(configs), overrides=base + overrides)
        self.new = _has("polymodal.training.loop", "optimizer_step")
        torch.manual_seed(self.config.seed)
        if self.new:
            self._prepare_new(run_dir, warm_cache)
        else:
            self._prepare_old(run_dir)
        self.model.train()

    def _prepare_new(self, run_dir: Path, warm_cache: bool) -> None:
        from polymodal.data.keyed import TrainingItems, load_noise_clips
        from polymodal.training.loop import start_state
        from polymodal.training.run import prepare_run
        from polymodal.training.sampler import CountedCollate, build_loader

        run = prepare_run(self.config, run_dir, resume=False)
        self.model = run.model
        self.state = start_state(self.model, self.config, run_dir, resume=False)
        self.dtype = self.state.dtype
        self.device = self.state.device
        train, data = self.config.train, self.config.data
        items = TrainingItems(
            run.splits.train, augment=data.augment, seed=self.config.seed, sample_rate=data.sample_rate, noise_clips=load_noise_clips(data)
        )  # fmt: skip
        if warm_cache:  # one epoch collated: every clip's log-mel frames kept
            epoch = build_loader(items, run.collator, batch_size=train.batch_size, seed=self.config.seed)
            for _, _ in zip(range(-(-len(items) // train.batch_size)), epoch):
                pass
            kept = run.collator._log_mels.values()
            print(f"new: {len(kept)} clips' log-mel frames kept, {sum(x.numel() * x.element_size() for x in kept) / 2**20:.0f} MiB", file=sys.stderr)
        loader = build_loader(
            items, CountedCollate(run.collator), batch_size=train.batch_size, seed=self.config.seed, num_workers=data.num_workers
        )  # fmt: skip
        self.pairs = iter(loader)
        if train.compile:  # as fit does: the blocks stay compiled for the worker's life
            from polymodal.training.compile import compiled_blocks

            self._compiled = compiled_blocks(self.model)
            self._compiled.__enter__()

    def _prepare_old(self, run_dir: Path) -> None:
        from polymodal.training.job import prepare
        from polymodal.training.loop import resolve_device, seed_everything
        from polymodal.training.optim import build_optimizer, build_scheduler
        from polymodal.training.precision import resolve_precision
        from polymodal.training.sampler import build_loader

        run = prepare(self.config, run_dir=run_dir, train_tokenizer=True)
        self.model = run.model
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_precision(self.config.train.precision, self.device)
        seed_everything(self.config.seed)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, self.config.train)
        self.scheduler = build_scheduler(self.optimizer, self.config.train)
        loader = build_loader(run.data.train, run.collator, batch_size=self.config.train.batch_size, seed=self.config.seed)
        self.batches = iter(loader)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def block(self, steps: int) -> float:
        """Seconds for ``steps`` optimiser steps, the loop started afresh (as ``fit`` starts it);
        on a GPU, until its queued work has finished."""
        if not self.new:
            self._synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                self._old_step()
            self._synchronize()
            return time.perf_counter() - start
        from polymodal.training.loop import optimizer_step
        from polymodal.training.sampler import Prefetcher

        self._synchronize()
        start = time.perf_counter()
        batches = Prefetcher(self.pairs, depth=self.config.train.prefetch)
        for _ in range(steps):
            optimizer_step(self.model, self.state, batches, self.config.train)
        self._synchronize()
        seconds = time.perf_counter() - start
        batches.close()
        return seconds

    def _old_step(self) -> None:
        """The optimiser step of c4f5646's ``fit``, as its loop ran it."""
        import math

        from polymodal.training.loop import accumulate_gradients

        train = self.config.train
        out = accumulate_gradients(
            self.model, self.batches, num_batches=train.grad_accum, device=self.device, dtype=self.dtype,
            loss_weights=train.loss_weights,
        )
        {name: term.item() for name, term in out.terms.items()}, out.total.item()
        max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self) -> float:
        """FLOPs of one step (forward + backward), counted as it runs."""
        from torch.utils.flop_counter import FlopCounterMode

        mode = FlopCounterMode(display=False)
        with mode:
            self.block(1)
        return float(mode.get_total_flops())

    def peak(self, dtype: str) -> float:
        """This machine's matmul FLOP/s in ``dtype`` on the step's device (asked of the new worker:
        the old tree has no probe)."""
        from polymodal.training.mfu import matmul_peak

        return matmul_peak(getattr(self.torch, dtype), self.device.type)

    def profile(self, steps: int) -> list[tuple[str, float, float]]:
        """The top ops of ``steps`` steps by self CPU time: (name, share of the total, ms per step)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.block(steps)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_OPS]
        return [(e.key, e.self_cpu_time_total / total, e.self_cpu_time_total / 1e3 / steps) for e in top]


def _has(module: str, name: str) -> bool:
    import importlib

    return hasattr(importlib.import_module(module), name)


def serve(precision: str, threads: int, overrides: list[str], warm_cache: bool) -> None:
    """The worker's loop: one JSON command per stdin line, one JSON answer per stdout line."""
    with tempfile.TemporaryDirectory() as run_dir:
        worker = Worker(precision, threads, Path(run_dir), overrides, warm_cache)
        answer = {"ready": True, "new": worker.new, "dtype": str(worker.dtype or "torch.float32").removeprefix("torch.")}
        print(json.dumps(answer), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command["do"] == "block":
                answer = {"seconds": worker.block(command["steps"])}
            elif command["do"] == "flops":
                answer = {"flops": worker.flops()}
            elif command["do"] == "peak":
                answer = {"peak": worker.peak(command["dtype"])}
            elif command["do"] == "profile":
                answer = {"top": worker.profile(command["steps"])}
            else:
                break
            print(json.dumps(answer), flush=True)


# ----------------------------------------------------------------------------- parent


class Side:
    """A worker process for one source tree."""

    def __init__(self, name: str, src: Path, precision: str, threads: int, overrides: list[str] = (), warm_cache: bool = False) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))  # its tree first
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", precision, "--threads", str(threads)]
        command += [f"--set={o}" for o in overrides] + (["--warm-cache"] if warm_cache else [])
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker stopped (see its stderr above)")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare_steps(args: argparse.Namespace, precision: str) -> dict:
    """Alternate blocks of steps between the two versions; per-step times and the new step's MFU."""
    old = Side("old", NEW_SRC, precision, args.threads, [], args.warm_cache) if args.old == "this" else Side("old", Path(args.old) / "src", precision, args.threads)
    sides = [old, Side("new", NEW_SRC, precision, args.threads, args.set, args.warm_cache)]
    try:
        for side in sides:
            side.ask(do="block", steps=args.warmup)
        times = {side.name: [] for side in sides}
        for block in range(args.blocks):
            for side in sides if block % 2 == 0 else sides[::-1]:
                times[side.name].append(side.ask(do="block", steps=args.block_steps)["seconds"] / args.block_steps)
        counts = {side.name: side.ask(do="flops") for side in sides}
        for side in sides:
            counts[side.name]["peak"] = sides[1].ask(do="peak", dtype=side.info["dtype"])["peak"]
        profiles = {side.name: side.ask(do="profile", steps=args.profile)["top"] for side in sides} if args.profile else {}
        dtypes = {side.name: side.info["dtype"] for side in sides}
    finally:
        for side in sides:
            side.close()
    return {"times": times, "counts": counts, "profiles": profiles, "dtypes": dtypes}


def report_steps(precision: str, result: dict, args: argparse.Namespace) -> None:
    times, counts = result["times"], result["counts"]
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"\nprecision={precision} (old ran {result['dtypes']['old']}, new ran {result['dtypes']['new']}); "
          f"{args.blocks} alternating blocks of {args.block_steps} steps after {args.warmup} warm-up steps")
    print(f"{'version':<8} {'ms/step med':>11} {'ms/step min':>11} {'samples/s':>10} {'GFLOP/step':>10} "
          f"{'peak GFLOP/s':>12} {'MFU':>6}")
    for name in ("old", "new"):
        step = statistics.median(times[name])
        flops, peak = counts[name]["flops"], counts[name]["peak"]
        print(f"{name:<8} {step * 1e3:>11.0f} {min(times[name]) * 1e3:>11.0f} {64 / step:>10.1f} {flops / 1e9:>10.2f} "
              f"{peak / 1e9:>12.1f} {flops / step / peak:>6.1%}")
    print(f"speed-up (old / new median step time): {old / new:.2f}x; per-block ratios: "
          + " ".join(f"{a / b:.2f}" for a, b in zip(times["old"], times["new"])))
    for name, top in result["profiles"].items():
        print(f"\n{name}: top {TOP_OPS} ops by self CPU time over {args.profile} steps")
        for op, share, ms in top:
            print(f"  {share:>6.1%} {ms:>9.1f} ms/step  {op[:70]}")


def backbone_mfu(args: argparse.Namespace) -> None:
    """bf16 (and fp32) MFU of our backbone's train step on ``bench_backbone.py``'s shapes, eager and
    with its blocks compiled as ``train.compile=true`` compiles them."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_backbone import SIZES, OursWrapper, make_train_step, model_flops_per_step

    from polymodal.training.compile import compiled_blocks
    from polymodal.training.mfu import matmul_peak

    torch.set_num_threads(args.threads)
    print(f"\nbackbone train step (forward + backward + AdamW), batch {args.batch} x seq {args.seq}, best of {args.steps}; "
          "compiled: the blocks compiled as train.compile=true does, after two steps of compilation")
    print(f"{'size':<6} {'kind':<8} {'prec':<5} {'GFLOP':>7} {'peak GFLOP/s':>12} {'eager ms':>9} {'MFU':>6} {'compiled ms':>12} {'MFU':>6}")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        for size in (SIZES["small"], SIZES["large"]):
            for kind in ("encoder", "decoder"):
                torch.manual_seed(0)
                model = OursWrapper(size, causal=kind == "decoder")
                step = make_train_step(model, args.batch, args.seq, size.dim, dtype, torch.device("cpu"))
                step()
                eager = min(step() for _ in range(args.steps))
                torch._dynamo.reset()  # each row's model compiles afresh (else dynamo's recompile limit turns later rows eager)
                with compiled_blocks(model.backbone):
                    step(), step()
                    compiled = min(step() for _ in range(args.steps))
                params = sum(p.numel() for p in model.parameters())
                flops = model_flops_per_step(params, size, args.batch, args.seq)
                peak = matmul_peak(dtype or torch.float32, "cpu")
                print(f"{size.name:<6} {kind:<8} {precision:<5} {flops / 1e9:>7.1f} {peak / 1e9:>12.1f} {eager * 1e3:>9.0f} "
                      f"{flops / eager / peak:>6.1%} {compiled * 1e3:>12.0f} {flops / compiled / peak:>6.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="/tmp/wt-c4f5646", help="a worktree of commit c4f5646, or 'this': this tree without --set")
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--block-steps", type=int, default=4)
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps of each version")
    parser.add_argument("--skip-steps", action="store_true", help="skip the old-vs-new step comparison")
    parser.add_argument("--backbone", action="store_true", help="also bench_backbone's shapes (bf16 and fp32 MFU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backbone row")
    parser.add_argument("--set", action="append", default=[], help="a config override for the new version only (train.compile=true)")
    parser.add_argument("--warm-cache", action="store_true", help="the new version collates one epoch first (its log-mel frames kept)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.threads, args.set, args.warm_cache)
        return
    import torch

    where = f"GPU {torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    print(f"torch {torch.__version__}, {where}{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f}; the new version with {args.set or 'the preset as it is'}, "
          f"{'after one epoch (log-mel frames kept)' if args.warm_cache else 'first epoch'}")
    if not args.skip_steps:
        for precision in args.precisions:
            report_steps(precision, compare_steps(args, precision), args)
    if args.backbone:
        backbone_mfu(args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
