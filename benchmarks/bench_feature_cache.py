"""What the feature cache saves: one batch through a frozen pretrained image encoder, computed, then
read back from the cache (in memory and from safetensors files on disk).

Claim: after the first epoch, a frozen ``hf_image`` encoder's batch costs a small fraction of
running it, so frozen-feature runs are bound by the rest of the model. The encoder is a ViT-S/16
shape (384 wide, 6 heads; 6 of its 12 blocks, to keep the run short) with random weights
saved to a temporary folder; the cache returns exactly the tokens the encoder computes (checked
first).

    OMP_NUM_THREADS=2 python benchmarks/bench_feature_cache.py
    python benchmarks/bench_feature_cache.py --batch 32 --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
import timeit
from pathlib import Path

import torch
import transformers

from polymodal.encoders.feature_cache import FeatureCache
from polymodal.encoders.hf_image import HFImageEncoder

IMAGE = (32, 96)  # the built-in numbers' size; the encoder pads and resizes to 224 x 224


def _encoder(folder: Path) -> HFImageEncoder:
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)
    transformers.ViTModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return HFImageEncoder(1, IMAGE, path=str(folder)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = _encoder(Path(tmp) / "vit")
        images = torch.rand(args.batch, 1, *IMAGE) * 2 - 1
        indices = list(range(args.batch))
        memory = FeatureCache(encoder, dataset="bench")
        disk = FeatureCache(encoder, dataset="bench", folder=Path(tmp) / "cache")
        with torch.no_grad():
            expected = encoder(images).tokens
        for cache in (memory, disk):  # the first epoch fills them
            assert torch.equal(cache(indices, images).tokens, expected)
        with torch.no_grad():
            paths = [lambda: encoder(images), lambda: memory(indices, images), lambda: disk(indices, images)]
            # Each path timed on its own: right after a seconds-long encoder call a loaded machine
            # deschedules the process, which would bill the next millisecond-long read for it.
            times = [min(timeit.repeat(path, number=1, repeat=args.repeats)) for path in paths]
        rows = list(zip(("encoder (uncached)", "cache, in memory", "cache, safetensors on disk"), times))
    base = rows[0][1]
    print(f"batch {args.batch} images {IMAGE} -> ViT 224/16, 384 wide, 6 blocks; {torch.get_num_threads()} threads")
    print(f"{'path':<28} {'ms / batch':>11} {'vs encoder':>11}")
    for name, seconds in rows:
        print(f"{name:<28} {seconds * 1e3:>11.2f} {base / seconds:>10.1f}x")


if __name__ == "__main__":
    main()
