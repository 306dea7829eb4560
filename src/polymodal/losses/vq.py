"""The two vector-quantisation loss terms of a VQ-VAE: the codebook term and the commitment term.

Reference: van den Oord et al. 2017, Neural Discrete Representation Learning, arXiv:1711.00937
(equation 3: ``||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2``). The paper's ``beta`` (0.25) is a
weight, so it lives in the training schedule (``train.loss_weights.commitment``), not here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def codebook_loss(inputs: Tensor, codes: Tensor) -> Tensor:
    """Pull the chosen codebook entries towards the (frozen) encoder outputs.

    Args:
        inputs: (..., D) encoder outputs z_e in code space.
        codes: (..., D) the chosen codebook entries e (differentiable w.r.t. the codebook).

    Returns:
        () mean squared error ``||sg[z_e] - e||^2`` averaged over every element.
    """
    return F.mse_loss(codes.float(), inputs.detach().float())


def commitment_loss(inputs: Tensor, codes: Tensor) -> Tensor:
    """Keep the encoder outputs close to their (frozen) codebook entries.

    Args:
        inputs: (..., D) encoder outputs z_e in code space.
        codes: (..., D) the chosen codebook entries e.

    Returns:
        () mean squared error ``||z_e - sg[e]||^2`` averaged over every element.
    """
    return F.mse_loss(inputs.float(), codes.detach().float())
