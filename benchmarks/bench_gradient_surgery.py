"""Step-time overhead of gradient surgery (PCGrad, GradNorm) against the plain weighted sum.

Claim measured: what one optimiser step costs with ``train.gradient_surgery`` set to ``pcgrad`` or
``gradnorm``, as a ratio to ``none``, on a small multi-loss model. PCGrad and GradNorm without a
``layer`` differentiate each loss term on its own through the whole model, where the plain sum runs
one backward pass: with a backward pass at about twice a forward and T terms sharing the trunk,
expect about (1 + 2T) / 3 times the plain step (3x for T = 4), plus the projections or the weight
update. GradNorm with ``layer`` (the paper's last shared layer, here the trunk's final norm)
differentiates each term only down to that layer, then the model once.

The model: token embedding -> polymodal's TransformerBackbone (shared by every term) -> four
private heads, one per term: next-token cross-entropy (generation), symmetric InfoNCE between two
pooled halves (contrastive), a Gaussian KL (the VAE's), and VICReg between the halves (alignment).
Each mode runs the same batches through ``accumulate_gradients`` plus AdamW; the modes take turns
step by step, and the median step time of each is reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_gradient_surgery.py    # CPU, 2 layers, batch 16 x 32 tokens
    python benchmarks/bench_gradient_surgery.py --device cuda --batch 128 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.backbones import TransformerBackbone
from polymodal.losses.alignment import vicreg
from polymodal.losses.contrastive import info_nce
from polymodal.losses.kl import gaussian_kl
from polymodal.models.output import StepOutput
from polymodal.training.gradient_surgery import build_gradient_surgery
from polymodal.training.loop import accumulate_gradients

MODES = ("none", "pcgrad", "gradnorm", "gradnorm-layer")
VOCAB = 512
LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature
WARMUP_STEPS = 3


class TokenBatch:
    """(B, N) token ids, with the ``size`` / ``to`` a training batch has."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.ids.to(device))


class MultiLossModel(nn.Module):
    """A shared transformer trunk and four private heads, one per loss term."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.trunk = TransformerBackbone(dim, num_layers=num_layers, num_heads=dim // 64)
        self.lm_head = nn.Linear(dim, VOCAB)
        self.left, self.right = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.posterior = nn.Linear(dim, 2 * dim)

    def forward(self, batch: TokenBatch) -> StepOutput:
        hidden = self.trunk(self.embed(batch.ids))  # (B, N, D)
        logits = self.lm_head(hidden[:, :-1])  # (B, N - 1, VOCAB): predict the next token
        first, second = hidden.chunk(2, dim=1)  # two halves of each sequence: (B, N / 2, D) each
        left, right = self.left(first.mean(1)), self.right(second.mean(1))  # (B, D)
        mean, logvar = self.posterior(hidden.mean(1)).chunk(2, dim=-1)  # (B, D) each
        losses = {
            "generation": F.cross_entropy(logits.flatten(0, 1), batch.ids[:, 1:].flatten()),
            "contrastive": info_nce(F.normalize(left, dim=-1), F.normalize(right, dim=-1), LOGIT_SCALE),
            "kl": gaussian_kl(mean, logvar).mean(),
            "alignment": vicreg(left, right),
        }
        return StepOutput(losses=losses)


def time_step(model: nn.Module, surgery, optimizer: torch.optim.Optimizer, batch: TokenBatch, device: torch.device) -> float:
    """Seconds of one optimiser step (gradients, surgery, AdamW)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    accumulate_gradients(model, iter([batch]), num_batches=1, device=device, dtype=None, loss_weights={}, surgery=surgery)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per mode")
    parser.add_argument("--gradnorm-layer", default="trunk.final_norm", help="W of gradnorm-layer: the last shared layer")
    args = parser.parse_args()
    device = torch.device(args.device)

    runs = {}
    for mode in MODES:
        torch.manual_seed(0)  # the same initial weights in every mode
        model = MultiLossModel(args.dim, args.layers).to(device)
        spec = {"name": "gradnorm", "layer": args.gradnorm_layer} if mode == "gradnorm-layer" else {"name": mode}
        surgery = build_gradient_surgery(spec, model)
        runs[mode] = (model, surgery, torch.optim.AdamW(model.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(0)
    batches = [TokenBatch(torch.randint(VOCAB, (args.batch, args.tokens), generator=gen).to(device)) for _ in range(4)]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for step in range(WARMUP_STEPS + args.steps):
        for mode in MODES:  # modes take turns, so a slow spell of a shared machine hits all alike
            seconds = time_step(*runs[mode][:3], batches[step % len(batches)], device)
            if step >= WARMUP_STEPS:
                times[mode].append(seconds)

    params = sum(p.numel() for p in runs["none"][0].parameters())
    print(f"device {device}, {params / 1e6:.2f}M parameters, 4 loss terms, batch {args.batch} x {args.tokens} tokens, "
          f"median of {args.steps} steps")  # fmt: skip
    print(f"{'surgery':<15} {'ms / step':>10} {'vs none':>8}")
    plain = statistics.median(times["none"])
    for mode in MODES:
        median = statistics.median(times[mode])
        print(f"{mode:<15} {1e3 * median:>10.1f} {median / plain:>7.2f}x")


if __name__ == "__main__":
    main()
