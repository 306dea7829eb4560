"""The built-in data's figures of generated images beyond the judge's reading: the Fréchet distance
between generated and real test images in the image judge's feature space (``ImageProbe.features``,
what its digit heads read), set against the same distance for the reference renderer (every
caption drawn in the one reference handwriting), and the variety of samples of one caption set
against real test images of one number.

A generator that draws one rendering per number (the reference renderer, or a decoder that
ignores its noise) misses the spread of real handwriting and layouts; the Fréchet distance counts
that spread, the judge's accuracy does not. Reference: Heusel et al. 2017, arXiv:1706.08500 (FID,
here in the judge's feature space instead of Inception's).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from polymodal.data.image import normalize_images
from polymodal.data.references import Reference
from polymodal.datasets.spoken_numbers.probes import ImageProbe
from polymodal.evaluation.frechet import frechet_distance, mean_pairwise_distance

FEATURE_BATCH = 250


@torch.no_grad()
def judge_features(judge: ImageProbe, images: Tensor, *, batch_size: int = FEATURE_BATCH) -> Tensor:
    """(N, 1, H, W) images in [-1, 1] -> (N, K) the judge's features, on the CPU."""
    judge.eval()
    device = next(judge.parameters()).device
    return torch.cat([judge.features(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def reference_renderings(references: dict[int, Reference], labels: Tensor) -> Tensor:
    """(N, 1, H, W) normalised: each label's reference drawing (one handwriting for every item)."""
    pixels = torch.stack([torch.from_numpy(references[int(n)].value) for n in labels.tolist()])[:, None].float() / 255.0
    return normalize_images(pixels)


def same_label_pairwise_l2(images: Tensor, labels: Tensor) -> float:
    """Mean over labels with two or more images of their mean pairwise L2 distance; NaN if none."""
    groups: dict[int, list[int]] = defaultdict(list)
    for row, label in enumerate(labels.tolist()):
        groups[label].append(row)
    spreads = [mean_pairwise_distance(images[rows]) for rows in groups.values() if len(rows) >= 2]
    return sum(spreads) / len(spreads) if spreads else float("nan")


def image_generation_figures(judge: ImageProbe, generated, references: dict[int, Reference]) -> dict[str, float]:
    """Fréchet distances in the judge's feature space (generated and reference renderer, each
    against the real images of the same captions) and variety against real same-number spread.

    Args:
        generated: ``evaluation.samples.Generated`` with ``images``, ``real`` and ``real_index``
            (and ``repeats`` for the variety figures).
        references: the reference drawing of every label asked for.
    """
    figures: dict[str, float] = {}
    if generated.real is None or len(generated.real) < 2:
        return figures
    real_labels = generated.labels[generated.real_index]
    real = judge_features(judge, generated.real)
    figures["frechet_judge_features"] = frechet_distance(judge_features(judge, generated.images[generated.real_index]), real)
    rendered = reference_renderings(references, real_labels)
    figures["frechet_judge_features_reference_renderer"] = frechet_distance(judge_features(judge, rendered), real)
    if generated.repeats is not None:
        variety = sum(mean_pairwise_distance(r) for r in generated.repeats) / len(generated.repeats)
        spread = same_label_pairwise_l2(generated.real, real_labels)
        figures.update(variety_l2=variety, real_same_number_l2=spread, variety_ratio=variety / spread)
    return figures
