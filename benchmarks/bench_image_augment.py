"""Image augmentation of one training batch: the images warped together (``augment_images``) against
one image at a time (``augment_image`` in a loop, as the items were augmented before), in one run.

The `generation` preset warps each training image (elastic and affine, each half the time) in the
prefetch thread, which shares the training step's 2 cores. Both sides make the same draws from the
same per-item generators and give the same images bit for bit (checked here, and in
``tests/data/test_augment_image.py``); the batched side resamples all the images a transform fires
on in one call. Images are 1 x 32 x 96, as the built-in data's.

    python benchmarks/bench_image_augment.py                      # the generation preset's settings, batch 64
    python benchmarks/bench_image_augment.py --threads 2 --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from polymodal.config import load_config
from polymodal.data.augment import AugmentSettings, sample_rng
from polymodal.data.augment_image import augment_image, augment_images


def batch_of_images(count: int, seed: int) -> list[torch.Tensor]:
    """White bars on black at random places, the built-in images' size."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        image = torch.zeros(1, 32, 96)
        for _ in range(3):
            top, left = (int(v) for v in torch.randint(0, 20, (2,), generator=generator))
            image[:, top : top + 10, 10 + 3 * left : 13 + 3 * left] = 1.0
        images.append(image)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per side per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the prefetch thread's share)")
    parser.add_argument("--preset", default="generation", help="the preset whose data.augment.image is timed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    augment: AugmentSettings = load_config([args.preset]).data.augment
    settings = augment.image
    if not settings.active:
        raise SystemExit(f"the {args.preset} preset augments no image; pick another with --preset")
    images = batch_of_images(args.batch, seed=0)

    def rngs(epoch: int) -> list:
        return [sample_rng(0, epoch, i, stream="image") for i in range(len(images))]

    def alone(epoch: int) -> list[torch.Tensor]:
        return [augment_image(image, settings, rng) for image, rng in zip(images, rngs(epoch))]

    def together(epoch: int) -> list[torch.Tensor]:
        return augment_images(images, settings, rngs(epoch))

    for epoch in range(3):  # warm-up (scipy.ndimage's import), and the two agree bit for bit
        if not all(torch.equal(a, b) for a, b in zip(alone(epoch), together(epoch))):
            raise SystemExit("the batched images differ from the one-at-a-time ones")
    times: dict[str, list[float]] = {"one at a time": [], "together": []}
    for round_ in range(args.rounds):  # alternate, so a load change hits both sides
        for name, run in (("one at a time", alone), ("together", together)):
            start = time.perf_counter()
            for epoch in range(args.batches):
                run(round_ * args.batches + epoch)
            times[name].append((time.perf_counter() - start) / args.batches)
    print(f"{args.preset} preset: {settings}")
    print(f"batch {args.batch} of 1 x 32 x 96, {args.threads} thread(s), median of {args.rounds} rounds of {args.batches} batches")
    for name, values in times.items():
        print(f"  {name:14s} {1e3 * statistics.median(values):7.2f} ms per batch")
    ratio = statistics.median(a / b for a, b in zip(times["one at a time"], times["together"]))
    print(f"  together is {ratio:.2f}x faster (median of the rounds' ratios); outputs equal bit for bit")


if __name__ == "__main__":
    main()
