"""The flow U-Net's training pass (forward and backward) with its GroupNorm computed in fp32
(``decoders/unet.py``'s ``MapNorm``) against torch's own ``nn.GroupNorm`` forward on the same
maps, in bf16 autocast and in fp32, alternated in one process.

Claim (BENCHMARKS.md, "The flow U-Net: its GroupNorm in fp32, its blocks compiled, ..."): the
U-Net's maps are channels-last (the view of its (B, h w, C) tokens, which the convolutions keep),
and torch's CPU GroupNorm on a channels-last bf16 map is several times slower than in fp32, so the
bf16 pass is faster with the norm upcast; in fp32 the two are the same computation. The shape is
the ``metaquery`` preset's image head: 32 x 96 pixels at patch 2 (a 16 x 48 grid of 4 values),
channels 32 x (1, 2, 2), 28 condition tokens of width 128, batch 64 images x 2 noise draws.

    python benchmarks/bench_flow_unet_step.py
    python benchmarks/bench_flow_unet_step.py --batch 128 --rounds 6 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from polymodal.decoders.unet import FlowUNet, MapNorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="alternations of the two norms")
    parser.add_argument("--steps", type=int, default=5, help="timed passes per round (after 2 untimed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = FlowUNet(4, (16, 48), 128, channels=32, channel_mults=(1, 2, 2))
    x, t = torch.randn(args.batch, 16 * 48, 4), torch.rand(args.batch)
    context, mask = torch.randn(args.batch, 28, 128), torch.ones(args.batch, 28, dtype=torch.bool)
    ours = MapNorm.forward
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| precision | nn.GroupNorm ms | MapNorm (fp32) ms | speed-up | per-round ratios |")
    print("| --- | ---: | ---: | ---: | --- |")
    for precision in ("bf16", "fp32"):

        def one_pass() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = net(x, t, context=context, context_mask=mask)
            out.float().square().mean().backward()

        times: dict[str, list[float]] = {"native": [], "fp32": []}
        for _ in range(args.rounds):
            for side in times:
                MapNorm.forward = nn.GroupNorm.forward if side == "native" else ours
                for _ in range(2):
                    one_pass()
                start = time.perf_counter()
                for _ in range(args.steps):
                    one_pass()
                times[side].append((time.perf_counter() - start) / args.steps * 1000)
        MapNorm.forward = ours
        native, fp32 = statistics.median(times["native"]), statistics.median(times["fp32"])
        ratios = " ".join(f"{a / b:.2f}" for a, b in zip(times["native"], times["fp32"]))
        print(f"| {precision} | {native:.0f} | {fp32:.0f} | {native / fp32:.2f}x | {ratios} |")


if __name__ == "__main__":
    main()
