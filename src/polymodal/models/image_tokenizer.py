"""Training wrapper for an image tokenizer (VQ-VAE or VAE): batches in, its named losses out.

Reference: van den Oord et al. 2017, Neural Discrete Representation Learning, arXiv:1711.00937.
"""

from __future__ import annotations

from torch import nn

from polymodal.data.batch import Batch
from polymodal.errors import DataError
from polymodal.modality import Modality
from polymodal.models.output import StepOutput


class ImageTokenizerModel(nn.Module):
    """Feeds the batch's images (normalised to [-1, 1] by the collator) to ``tokenizer.training_step``."""

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, batch: Batch) -> StepOutput:
        if Modality.IMAGE not in batch.inputs:
            raise DataError("an image tokenizer needs images, and this batch has none (check the data source)")
        images = batch.inputs[Modality.IMAGE][batch.present[Modality.IMAGE]]
        return self.tokenizer.training_step(images)
