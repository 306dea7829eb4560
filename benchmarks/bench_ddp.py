"""Communication overhead of data-parallel training on CPU (gloo): 2 processes x 1 thread against
1 process x 1 thread, at the same per-rank batch.

Claim: a data-parallel optimiser step (DDP's gradient all-reduce, the contrastive embeddings
gathered from both ranks, the loss averaged over ranks, the stop-signal check) costs at most 15%
more time than the same step in one process.

Three variants of the training loop's own step (``training.loop.optimizer_step``) on the main
job's model (the ``default`` preset, untrained image tokenizer) and its data:

* ``alone``: one process, no process group: the single-process baseline.
* ``pair, no comm``: two such processes at once, each on its own: the same load on the cores as
  the data-parallel run, without any communication.
* ``ddp``: two ranks of one gloo group, the model wrapped by ``distributed.data_parallel``.

The overhead of communication is ``ddp`` over ``pair, no comm`` (same cores, same load); ``ddp``
over ``alone`` adds what sharing the machine's cores and memory bandwidth costs. Each variant
runs in fresh processes, in rounds (alone, pair, ddp, alone, ...), so a change in the machine's
load hits all three; the table gives the median step over every round. Last, the ddp ranks time
an all-reduce of a tensor as large as the model's gradients with nothing else running: the
communication itself, apart from what the cores' load does to the steps.

    OMP_NUM_THREADS=1 python benchmarks/bench_ddp.py                  # batch 16 per rank, 3 rounds
    OMP_NUM_THREADS=1 python benchmarks/bench_ddp.py --batch-size 32 --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

WARMUP_STEPS = 2  # the first steps allocate and warm the allocator; not timed


def step_times(config_args: list[str], steps: int, run_dir: Path, out: Path, start_together) -> None:
    """Time ``steps`` optimiser steps (after the warm-up) of this process's run; write them to
    ``out``. The processes of a variant start timing together (``start_together``, a barrier)."""
    from polymodal.config import load_config
    from polymodal.distributed.collectives import any_rank
    from polymodal.distributed.data_parallel import data_parallel
    from polymodal.distributed.process import rank
    from polymodal.training.loop import optimizer_step, start_state
    from polymodal.training.run import prepare_run
    from polymodal.distributed.process import world_size
    from polymodal.training.sampler import CountedCollate, Prefetcher, build_loader

    torch.set_num_threads(1)
    config = load_config(["default"], config_args)
    torch.manual_seed(config.seed)
    run = prepare_run(config, run_dir / f"rank{rank()}", resume=False)
    state = start_state(run.model, config, run_dir / f"rank{rank()}", resume=False)
    trainer = data_parallel(run.model, state.device)
    train = config.train
    loader = build_loader(run.splits.train, CountedCollate(run.collator), batch_size=train.batch_size, seed=config.seed,
                          rank=rank(), world_size=world_size())  # fmt: skip
    batches = Prefetcher(iter(loader), depth=0)
    start_together.wait()  # not while another process still prepares its run
    times = []
    for index in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        optimizer_step(trainer, state, batches, train)
        any_rank(False)  # fit's per-step stop check
        if index >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    torch.save(times, out / f"times{rank()}.pt")
    if world_size() > 1:  # the gradient all-reduce alone, the cores otherwise idle
        torch.save(all_reduce_times(run.model, steps), out / f"allreduce{rank()}.pt")


def all_reduce_times(model: torch.nn.Module, repeats: int) -> list[float]:
    """Seconds of an all-reduce of one flat fp32 tensor as large as ``model``'s gradients."""
    import torch.distributed as dist

    flat = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - start)
    return times


def _process(
    index: int, world: int, port: int, grouped: bool, config_args: list[str], steps: int, run_dir: Path, out: Path, barrier
) -> None:
    from polymodal.distributed.process import process_group

    os.environ["OMP_NUM_THREADS"] = "1"
    if grouped:
        os.environ.update(RANK=str(index), WORLD_SIZE=str(world), LOCAL_RANK=str(index), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # fmt: skip
        with process_group(torch.device("cpu")):
            step_times(config_args, steps, run_dir, out, barrier)
    else:
        step_times(config_args, steps, run_dir, out / f"p{index}", barrier)


def run_variant(nprocs: int, grouped: bool, config_args: list[str], steps: int) -> tuple[list[float], list[float]]:
    """Every process's timed steps, and (grouped) its timed gradient all-reduces, in seconds."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for index in range(nprocs):
            (out / f"p{index}").mkdir()
        barrier = mp.get_context("spawn").Barrier(nprocs)
        mp.spawn(_process, args=(nprocs, port, grouped, config_args, steps, out / "runs", out, barrier), nprocs=nprocs, join=True)
        steps_s = [t for path in sorted(out.rglob("times*.pt")) for t in torch.load(path)]
        return steps_s, [t for path in sorted(out.rglob("allreduce*.pt")) for t in torch.load(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="items per rank per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per process per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=400, help="the built-in dataset's size")
    args = parser.parse_args()
    config_args = [f"train.batch_size={args.batch_size}", f"data.options.num_samples={args.num_samples}", "device=cpu",
                   "train.progress=false", "train.precision=fp32", "train.prefetch=0"]  # fmt: skip
    variants = {"alone": (1, False), "pair, no comm": (2, False), "ddp": (2, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    reduce_times: list[float] = []
    for round_index in range(args.rounds):
        for name, (nprocs, grouped) in variants.items():
            step_s, reduce_s = run_variant(nprocs, grouped, config_args, args.steps)
            times[name] += step_s
            reduce_times += reduce_s
            print(f"round {round_index + 1}: {name} done ({statistics.median(times[name]) * 1e3:.0f} ms median so far)", flush=True)
    base, pair = statistics.median(times["alone"]), statistics.median(times["pair, no comm"])
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    print(f"batch {args.batch_size} per rank, {args.steps} steps x {args.rounds} rounds per process\n")
    print("| variant | processes | ms / step (median) | vs alone | vs pair, no comm |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (nprocs, _) in variants.items():
        median = statistics.median(times[name])
        print(f"| {name} | {nprocs} | {median * 1e3:.0f} | {median / base:.3f}x | {median / pair:.3f}x |")
    reduce = statistics.median(reduce_times)
    print(f"\ngradient all-reduce alone (gloo, 2 ranks): {reduce * 1e3:.1f} ms median = {reduce / base:.1%} of a step alone")


if __name__ == "__main__":
    main()
