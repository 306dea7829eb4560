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
from torch.utils.data import Dataset

from polymodal.data.image import denormalize_images
from polymodal.evaluation.sharding import map_batches
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
    """PSNR (dB, mean over images) and, for a VQ tokenizer, code usage and perplexity over the
    split; in a data-parallel run every rank reconstructs its share of the batches and returns the
    figures of them all (``evaluation/sharding.py``).

    Returns:
        the figures, and (2 * GRID_COLUMNS, C, H, W) images in [-1, 1]: first originals, then
        their reconstructions.
    """
    was_training = tokenizer.training
    tokenizer.eval()

    def reconstruct(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """(n,) PSNR per image, the (n * h * w,) codes (VQ) and the preview pair, on the CPU."""
        if Modality.IMAGE not in batch.inputs:
            return None
        images = batch.inputs[Modality.IMAGE][batch.present[Modality.IMAGE]].to(device)
        reconstructions = tokenizer.reconstruct(images)
        codes = tokenizer.encode(images).flatten().cpu() if hasattr(tokenizer, "quantizer") else None
        shown = torch.cat([images[:GRID_COLUMNS], reconstructions[:GRID_COLUMNS]]).cpu()
        return psnr(reconstructions, images).cpu(), codes, shown

    # Each batch reconstructed by one rank of a data-parallel run; every rank gets them all.
    done = [out for out in map_batches(dataset, collate_fn, reconstruct, batch_size=batch_size) if out is not None]
    tokenizer.train(was_training)
    scores = [score for score, _, _ in done]
    codes = [code for _, code, _ in done if code is not None]
    preview = done[0][2] if done else None
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
