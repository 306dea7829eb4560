"""Image-tokenizer figures on a split: PSNR, codebook usage over the whole split, and a PNG grid of
originals over reconstructions.

Usage is counted over every code the split produces (not per batch), so it measures how much of the
codebook the tokenizer really uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from polymodal.data.image import denormalize_images
from polymodal.modality import Modality
from polymodal.tokenizers import psnr
from polymodal.tokenizers.vector_quantizer import codebook_usage

GRID_COLUMNS = 8
GRID_ZOOM = 2  # preview pixels per image pixel


@torch.no_grad()
def reconstruction_figures(
    tokenizer: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR (dB, mean over images) and, for a VQ tokenizer, code usage and perplexity over the split.

    Returns:
        the figures, and (2 * GRID_COLUMNS, C, H, W) images in [-1, 1]: first originals, then
        their reconstructions.
    """
    was_training = tokenizer.training
    tokenizer.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    scores, codes, preview = [], [], None
    for batch in loader:
        if Modality.IMAGE not in batch.inputs:
            continue
        images = batch.inputs[Modality.IMAGE][batch.present[Modality.IMAGE]].to(device)
        reconstructions = tokenizer.reconstruct(images)
        scores.append(psnr(reconstructions, images))
        if hasattr(tokenizer, "quantizer"):
            codes.append(tokenizer.encode(images).flatten())
        if preview is None:
            preview = torch.cat([images[:GRID_COLUMNS], reconstructions[:GRID_COLUMNS]]).cpu()
    tokenizer.train(was_training)
    if not scores:
        raise ValueError("the split has no images to reconstruct")
    figures = {"psnr": float(torch.cat(scores).mean()), "count": int(sum(len(s) for s in scores))}
    if codes:
        perplexity, usage = codebook_usage(torch.cat(codes), tokenizer.quantizer.num_codes)
        figures.update(code_usage=float(usage), perplexity=float(perplexity))
    return figures, preview


def image_grid(images: torch.Tensor, *, columns: int = GRID_COLUMNS) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*H, columns*W, 3) uint8 image, zoomed for viewing."""
    pixels = (denormalize_images(images).clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    rows = (len(pixels) + columns - 1) // columns
    height, width = pixels.shape[-2:]
    canvas = torch.zeros(3, rows * height, columns * width, dtype=torch.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    grid = canvas.permute(1, 2, 0).numpy()
    return grid.repeat(GRID_ZOOM, axis=0).repeat(GRID_ZOOM, axis=1)


def save_png(grid: np.ndarray, path: str | Path) -> Path:
    Image.fromarray(grid).save(path)
    return Path(path)
