"""Training throughput of polymodal's TransformerBackbone against lucidrains' x-transformers.

Claim: one train step (forward + backward + AdamW) of our backbone runs at least as many tokens/s
as ``x_transformers.Encoder`` / ``Decoder`` configured to the same maths (pre-norm RMSNorm,
SwiGLU with the same hidden width, full-width RoPE, SDPA attention, no biases), in fp32 and under
bf16 autocast. Model-FLOPs utilisation (MFU) is reported against this machine's matmul peak,
measured here with a large ``F.linear`` in each dtype.

    python benchmarks/bench_backbone.py                      # both sizes, fp32 and bf16
    python benchmarks/bench_backbone.py --sizes small --precisions fp32 --steps 3
    python benchmarks/bench_backbone.py --device cuda --sizes small large xl --steps 20 --bf16-steps 20

Needs ``pip install x-transformers`` (a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.backbones import TransformerBackbone
from polymodal.models.masks import causal_mask
from polymodal.training.mfu import synchronize

PEAK_SIZE = {"cpu": 2048, "cuda": 8192}  # square matmuls large enough to reach the plateau (BLAS / oneDNN, cuBLAS)


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    dim: int
    num_layers: int
    num_heads: int


SIZES = {
    "small": Size("small", 256, 4, 4),
    "large": Size("large", 512, 6, 8),
    "xl": Size("xl", 1024, 8, 16),  # a GPU's size: the small ones leave most of its units idle
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """Best FLOP/s of a square ``F.linear`` (the kernel nn.Linear uses) of PEAK_SIZE on ``device``."""
    size = PEAK_SIZE[device.type]
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    F.linear(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        F.linear(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class OursWrapper(nn.Module):
    """Our backbone; ``causal`` passes a causal mask like the model does for targets."""

    def __init__(self, size: Size, causal: bool) -> None:
        super().__init__()
        self.backbone = TransformerBackbone(size.dim, num_layers=size.num_layers, num_heads=size.num_heads)
        self.causal = causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(tokens.shape[1], device=tokens.device) if self.causal else None
        return self.backbone(tokens, mask=mask)


def x_transformers_peer(size: Size, causal: bool, dim_hidden: int) -> nn.Module:
    """x-transformers with our recipe: same width/depth/heads, SwiGLU of the same hidden width
    (ff_mult = dim_hidden / dim), RMSNorm, full-width rotary, flash (SDPA) attention, no biases."""
    from x_transformers import Decoder, Encoder

    layers = Decoder if causal else Encoder
    return layers(
        dim=size.dim,
        depth=size.num_layers,
        heads=size.num_heads,
        attn_dim_head=size.dim // size.num_heads,
        ff_mult=dim_hidden / size.dim,
        ff_glu=True,
        ff_swish=True,
        ff_no_bias=True,
        use_rmsnorm=True,
        rotary_pos_emb=True,
        rotary_emb_dim=size.dim // size.num_heads,
        attn_flash=True,
    )


def model_flops_per_step(params: int, size: Size, batch: int, seq: int) -> float:
    """6 * params * tokens for the matmuls (forward 2, backward 4) plus 12 * L * N^2 * D per sequence
    for the attention scores and mixing (PaLM's MFU convention, Chowdhery et al. 2022,
    arXiv:2204.02311; full, not causal-halved, attention for both models)."""
    return 6 * params * batch * seq + 12 * size.num_layers * seq**2 * size.dim * batch


def port_weights(ours: TransformerBackbone, peer: nn.Module) -> None:
    """Copy our weights into the x-transformers model, so both compute the same function.

    x-transformers rotates adjacent feature pairs (2k, 2k+1) where we rotate (k, k + head_dim/2), at
    the same frequency k: reordering the rows of the query and key projections maps one onto the
    other. Its GLU splits (up, gate) where we split (gate, up), and its GLU projection has a bias,
    set to zero here. Its RMSNorm gains may be stored as an offset from one (``unit_offset``).
    """

    def copy_gain(norm: nn.Module, weight: torch.Tensor) -> None:
        norm.g.copy_(weight - float(getattr(norm, "unit_offset", False)))

    heads, head_dim = ours.num_heads, ours.head_dim
    half = torch.arange(head_dim // 2)
    interleave = torch.stack((half, half + head_dim // 2), dim=-1).flatten()  # x-tf row r <- our row
    rows = (torch.arange(heads)[:, None] * head_dim + interleave).flatten()  # (D,) over all heads
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            attn_norm, attn = peer.layers[2 * i][0][0], peer.layers[2 * i][1]
            mlp_norm, mlp = peer.layers[2 * i + 1][0][0], peer.layers[2 * i + 1][1]
            copy_gain(attn_norm, block.attn_norm.weight)
            attn.to_q.weight.copy_(block.attn.q_proj.weight[rows])
            attn.to_k.weight.copy_(block.attn.k_proj.weight[rows])
            attn.to_v.weight.copy_(block.attn.v_proj.weight)
            attn.to_out.weight.copy_(block.attn.o_proj.weight)
            copy_gain(mlp_norm, block.mlp_norm.weight)
            gate, up = block.mlp.gate_up_proj.weight.chunk(2, dim=0)
            mlp.ff[0].proj.weight.copy_(torch.cat((up, gate), dim=0))
            mlp.ff[0].proj.bias.zero_()
            mlp.ff[-1].weight.copy_(block.mlp.down_proj.weight)
        copy_gain(peer.final_norm, ours.final_norm.weight)


def make_train_step(model: nn.Module, batch: int, seq: int, dim: int, dtype: torch.dtype | None, device: torch.device):
    """A closure running one train step (forward + backward + AdamW) and returning its seconds."""
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(tokens)
        loss = out.float().pow(2).mean()  # a stand-in loss touching every output
        loss.backward()
        optimizer.step()
        synchronize(device)
        return time.perf_counter() - start

    return step


def time_pair(step_ours, step_peer, warmup: int, steps: int) -> tuple[float, float]:
    """Fastest step of each model; the two alternate so that load from other processes on the
    shared cores hits both alike, and the minimum is the least disturbed measurement."""
    for _ in range(warmup):
        step_ours()
        step_peer()
    ours, peer = [], []
    for _ in range(steps):
        ours.append(step_ours())
        peer.append(step_peer())
    return min(ours), min(peer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--kinds", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16-steps", type=int, default=1, help="timed steps under bf16 (slow on CPUs without bf16 units)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    # The cores are shared: the peak is re-measured after every configuration and the highest
    # figure seen is used, so MFU is not flattered by a peak measured during a busy moment.
    peaks = {name: matmul_peak(dtype or torch.float32, device) for name, dtype in PRECISIONS.items() if name in args.precisions}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}"
          + (" (fp32 matmuls in full fp32, no TF32)" if device.type == "cuda" else ""))
    print(f"batch {args.batch}, seq {args.seq}, train step = forward + backward + AdamW; fastest of "
          f"{args.steps} (fp32) / {args.bf16_steps} (bf16) alternating timed steps after {args.warmup} warmup")
    rows = []
    for size_name in args.sizes:
        size = SIZES[size_name]
        for kind in args.kinds:
            causal = kind == "decoder"
            for precision in args.precisions:
                dtype = PRECISIONS[precision]
                steps = args.steps if dtype is None else args.bf16_steps
                torch.manual_seed(0)
                ours = OursWrapper(size, causal)
                peer = x_transformers_peer(size, causal, ours.backbone.dim_hidden)
                # x-transformers has a (zeroed) bias on its GLU projection: 2 * dim_hidden per layer.
                params_ours = sum(p.numel() for p in ours.parameters())
                params_peer = sum(p.numel() for p in peer.parameters())
                port_weights(ours.backbone, peer)
                probe = torch.randn(2, 64, size.dim)
                with torch.no_grad():
                    mismatch = (ours(probe) - peer(probe)).abs().max().item()
                t_ours, t_peer = time_pair(
                    make_train_step(ours, args.batch, args.seq, size.dim, dtype, device),
                    make_train_step(peer, args.batch, args.seq, size.dim, dtype, device),
                    args.warmup,
                    steps,
                )
                peaks[precision] = max(peaks[precision], matmul_peak(dtype or torch.float32, device))
                rows.append((size, kind, precision, params_ours, params_peer, t_ours, t_peer, mismatch))
                print(f"  done {size.name} {kind} {precision}: ours {t_ours:.2f} s/step, x-tf {t_peer:.2f} s/step",
                      flush=True)

    print()
    for name, peak in peaks.items():
        print(f"measured {name} matmul peak (best {PEAK_SIZE[device.type]}^3 F.linear seen): {peak / 1e9:.1f} GFLOP/s")
    print("ratio = ours tok/s / x-transformers tok/s; max diff = |ours - x-tf| in fp32 after porting our weights")
    header = f"{'size':<6} {'kind':<8} {'prec':<5} {'params (M)':>11} {'ours tok/s':>11} {'x-tf tok/s':>11} " \
             f"{'ratio':>6} {'ours MFU':>9} {'x-tf MFU':>9} {'max diff':>9}"
    print(header)
    print("-" * len(header))
    tokens = args.batch * args.seq
    for size, kind, precision, params_ours, params_peer, t_ours, t_peer, mismatch in rows:
        flops = model_flops_per_step(params_ours, size, args.batch, args.seq)
        peak = peaks[precision]
        print(
            f"{size.name:<6} {kind:<8} {precision:<5} {params_ours / 1e6:>5.2f}/{params_peer / 1e6:<5.2f} "
            f"{tokens / t_ours:>11.0f} {tokens / t_peer:>11.0f} {t_peer / t_ours:>6.2f} "
            f"{flops / t_ours / peak:>9.1%} {flops / t_peer / peak:>9.1%} {mismatch:>9.1e}"
        )


if __name__ == "__main__":
    main()
