"""Sampling speed of the flow-matching image head against its step count, sampler and guidance,
and of the VQ-code head (``vq_codes``: one backbone position per code (48) or per code column (12,
the ``generation`` preset), drawn one by one through the KV cache, with and without guidance, and
the best of 4 grids per caption as the preset draws), with the aligned VQ head's one pass (the
decoder both replace) as the baseline, in one process.

Claim (BENCHMARKS.md, "Generation from any data"): a flow sample costs one pass of the queries
through the backbone plus one DiT evaluation per Euler step (two per Heun step, each doubled by
classifier-free guidance, batched), so images/s falls in inverse proportion to the evaluations; the
table gives the figure for every setting the ``metaquery`` preset can pick. Weights are random (the
speed of a pass does not depend on them); the models are the ``metaquery`` and ``generation``
presets'.

    python benchmarks/bench_flow_sampling.py
    python benchmarks/bench_flow_sampling.py --batch-size 50 --steps 4 8 16 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from polymodal.config import load_config
from polymodal.decoders.flow_sampling import evaluations
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.models.shapes import DataShapes, TextSpecials

SHAPES = DataShapes(image_size=(32, 96), num_mels=64, text=TextSpecials(400, 0, 1, 2), num_audio_frames=201)
BASELINE = ["model.heads.image={name: aligned_vq}", "model.image_tokenizer={name: vqvae, channels: 64, num_downsamples: 3, dim: 64, num_codes: 512}"]


def images_per_second(model, ids, mask, *, repeats: int, **options) -> float:
    model.generate(Modality.TEXT, Modality.IMAGE, ids, mask, **options)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.generate(Modality.TEXT, Modality.IMAGE, ids, mask, **options)
    return repeats * len(ids) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(3, 400, (args.batch_size, 5))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids, dtype=torch.bool)
    flow = build_model(load_config(["metaquery"], ["model.tasks=[text_to_image]", "model.task_fractions={}"]), SHAPES).eval()
    vq = build_model(load_config(["metaquery"], ["model.tasks=[text_to_image]", "model.task_fractions={}", *BASELINE]), SHAPES).eval()
    baseline = images_per_second(vq, ids, mask, repeats=args.repeats)
    print(f"batch {args.batch_size}, {args.threads} threads; aligned_vq (one pass, the baseline): {baseline:.1f} images/s")
    print("| sampler | steps | guidance | DiT evaluations | images/s | x baseline |")
    print("| --- | --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for sampler in ("euler", "heun"):
            for steps in args.steps:
                for guidance in (1.0, 2.0):
                    rate = images_per_second(flow, ids, mask, repeats=args.repeats, steps=steps, sampler=sampler, guidance=guidance)
                    calls = evaluations(sampler, steps) * (1 if guidance == 1.0 else 2)
                    print(f"| {sampler} | {steps} | {guidance:g} | {calls} | {rate:.1f} | {rate / baseline:.3f} |")
        settings = (  # (group, candidates, guidance scales, row name)
            ("[1, 1]", 1, (1.0, 3.0), "vq_codes, one position per code"),
            ("[4, 1]", 1, (1.0, 3.0), "vq_codes, one position per column"),
            ("[4, 1]", 4, (3.0,), "vq_codes, one position per column, best of 4 (+ one teacher-forced scoring pass)"),
        )
        for group, candidates, scales, name in settings:
            overrides = ["model.tasks=[text_to_image]", f"model.heads.image.group={group}", f"model.heads.image.candidates={candidates}"]
            codes = build_model(load_config(["generation"], overrides), SHAPES).eval()
            steps = codes.head(Modality.IMAGE).num_positions
            for guidance in scales:
                rate = images_per_second(codes, ids, mask, repeats=args.repeats, guidance=guidance)
                calls = steps * (1 if guidance == 1.0 else 2) * candidates
                print(f"| {name} | {steps} | {guidance:g} | {calls} | {rate:.1f} | {rate / baseline:.3f} |")


if __name__ == "__main__":
    main()
