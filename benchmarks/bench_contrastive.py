"""Benchmark: polymodal's tiled InfoNCE against open_clip's dense ``ClipLoss``, batch 1k to 64k.

Claims (issue 5), embeddings of dim 512, one process: the tiled loss peaks at <= 1/10 of the dense
loss's memory at batch 32k, takes <= 1.5x its time at 4k, and runs batch 64k on a 24 GiB machine.

Both sides compute the symmetric CLIP loss of (N, 512) unit vectors with a learnable scale (a ()
tensor that requires grad, as CLIP's ``logit_scale.exp()``), forward then backward to both inputs
and the scale. The peer is ``open_clip.loss.ClipLoss()`` (world size 1), loaded from its file
because importing the ``open_clip`` package needs torchvision; ours is ``info_nce_tiled`` at its
default tile size, and ``info_nce_dense`` is shown for reference.

Every (variant, N) runs in its own fresh subprocess, 2 threads:
  * time: one step is forward + backward; for N <= 4096 the median of ``--steps`` steps after one
    warm-up step, above that a single step (they take seconds to minutes);
  * peak memory: the growth of the process's peak resident set (``getrusage().ru_maxrss``) over the
    resident set just before the first step (``/proc/self/statm``), i.e. everything the loss
    allocates beyond its inputs: logits, saved tensors, the gradients of the inputs (2 x N x 512
    floats, 256 MiB at 64k, on both sides alike) and allocator overheads.
One step at N = 256 runs first, so one-time library set-up (thread pools, allocator arenas) is not
counted. A dense variant whose estimated peak (``DENSE_FLOATS_PER_PAIR`` floats per logit) exceeds
``--dense-limit-gib`` is not run, as the machine is shared; its figure is then extrapolated as
(measured peak at the largest size run) x (N / that size)^2 and marked "est.".

Usage:
    python benchmarks/bench_contrastive.py                      # the table, all sizes (minutes)
    python benchmarks/bench_contrastive.py --sizes 1024 4096    # a subset
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DIM = 512
THREADS = 2
SIZES = [1024, 4096, 16384, 32768, 65536]
SETUP_SIZE = 256  # a first, tiny step that pays one-time set-up costs outside the measurement
REPEATED_UP_TO = 4096  # sizes up to this get a warm-up and several timed steps
# Upper bound on the dense peak in floats per logit (two logit matrices, log-softmaxes, their
# gradients); measured about 4.4 for open_clip at 4k and 16k, so the bound is conservative.
DENSE_FLOATS_PER_PAIR = 7
VARIANTS = ["open_clip", "polymodal-tiled", "polymodal-dense"]
DENSE_VARIANTS = {"open_clip", "polymodal-dense"}


def load_clip_loss() -> type:
    """open_clip's ``ClipLoss`` class, from ``open_clip/loss.py`` alone (it imports only torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ClipLoss


def build(variant: str):
    """A callable (a, b, scale) -> () loss."""
    if variant == "open_clip":
        return load_clip_loss()()
    from polymodal.losses.contrastive import info_nce_dense, info_nce_tiled

    if variant == "polymodal-tiled":
        return info_nce_tiled
    if variant == "polymodal-dense":
        return info_nce_dense
    raise ValueError(f"unknown variant {variant!r}")


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def child(variant: str, num: int, steps: int) -> dict[str, float]:
    """Run in a fresh process: time and peak memory of forward + backward at batch ``num``."""
    torch.set_num_threads(THREADS)
    loss_fn = build(variant)
    gen = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(num, DIM, generator=gen), dim=1).requires_grad_()  # (N, D)
    b = F.normalize(torch.randn(num, DIM, generator=gen), dim=1).requires_grad_()  # (N, D)
    scale = torch.tensor(1 / 0.07, requires_grad=True)  # () as LogitScale()() at init

    def step(a: torch.Tensor, b: torch.Tensor) -> float:
        a.grad = b.grad = scale.grad = None
        start = time.perf_counter()
        loss = loss_fn(a, b, scale)
        loss.backward()
        seconds = time.perf_counter() - start
        del loss
        return seconds

    step(a[:SETUP_SIZE].detach().requires_grad_(), b[:SETUP_SIZE].detach().requires_grad_())
    rss_before = current_rss_kib()
    times = [step(a, b)]
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    if num <= REPEATED_UP_TO:
        times = [step(a, b) for _ in range(steps)]  # the first step was the warm-up
    return {"seconds": statistics.median(times), "peak_mib": peak_mib}


def run_child(variant: str, num: int, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, str(num), "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--steps", type=int, default=5, help="timed steps for N <= 4096 (default 5)")
    parser.add_argument("--dense-limit-gib", type=float, default=8.0, help="skip dense runs estimated above this")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.steps)))
        return

    from polymodal.losses.contrastive import DEFAULT_TILE_SIZE

    load = os.getloadavg()[0]
    print(f"dim {DIM}, forward + backward, {THREADS} threads, torch {torch.__version__}, tile {DEFAULT_TILE_SIZE}, "
          f"load average at start {load:.1f} on {os.cpu_count()} CPUs")
    results: dict[tuple[str, int], dict] = {}
    largest_dense: dict[str, int] = {}
    for num in sorted(args.sizes):
        for variant in VARIANTS:  # one at a time: never two large runs at once
            estimate_gib = DENSE_FLOATS_PER_PAIR * num * num * 4 / 2**30
            if variant in DENSE_VARIANTS and estimate_gib > args.dense_limit_gib:
                results[variant, num] = {"skipped": f"est. {estimate_gib:.0f} GiB > {args.dense_limit_gib:g}"}
                continue
            results[variant, num] = run_child(variant, num, args.steps)
            if variant in DENSE_VARIANTS and "peak_mib" in results[variant, num]:
                largest_dense[variant] = num
            print(f"  {variant} N={num}: {results[variant, num]}", file=sys.stderr, flush=True)

    def cell(variant: str, num: int) -> tuple[str, str, float | None, float | None]:
        """(time text, memory text, seconds, peak MiB); estimates for skipped dense runs."""
        r = results[variant, num]
        if "seconds" in r:
            return f"{r['seconds']:.3f}", f"{r['peak_mib']:.0f}", r["seconds"], r["peak_mib"]
        if "skipped" in r and variant in largest_dense:
            ref = largest_dense[variant]
            peak = results[variant, ref]["peak_mib"] * (num / ref) ** 2
            return "skipped", f"{peak:.0f} est.", None, peak
        return r.get("error", "skipped")[:20], "-", None, None

    print("| N | open_clip s | tiled s | dense s | open_clip MiB | tiled MiB | dense MiB "
          "| time tiled/open_clip | memory tiled/open_clip |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num in sorted(args.sizes):
        peer_t, peer_m, peer_s, peer_mib = cell("open_clip", num)
        ours_t, ours_m, ours_s, ours_mib = cell("polymodal-tiled", num)
        dense_t, dense_m, _, _ = cell("polymodal-dense", num)
        time_ratio = f"{ours_s / peer_s:.2f}" if ours_s and peer_s else "-"
        mem_ratio = f"{ours_mib / peer_mib:.3f}" if ours_mib and peer_mib else "-"
        if "est." in peer_m and mem_ratio != "-":
            mem_ratio += " est."
        cells = [num, peer_t, ours_t, dense_t, peer_m, ours_m, dense_m, time_ratio, mem_ratio]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
