"""The learned inverse temperature of a contrastive loss, CLIP's ``logit_scale``.

The parameter is the log of the scale, so the optimiser works on a scale-free quantity; it starts
at log(1 / 0.07) and its exponential is clipped at 100: CLIP (section 2.5) reports that letting the
logits grow beyond 100x made training unstable.

Reference: Radford et al. 2021, Learning Transferable Visual Models From Natural Language
Supervision (CLIP), arXiv:2103.00020; the 0.07 initial temperature follows Wu et al. 2018,
Unsupervised Feature Learning via Non-Parametric Instance Discrimination, arXiv:1805.01978.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DEFAULT_INIT_SCALE = 1.0 / 0.07  # CLIP: temperature 0.07 at the start of training
DEFAULT_MAX_SCALE = 100.0  # CLIP: the scale is clipped at 100


class LogitScale(nn.Module):
    """A learnable multiplier ``exp(log_scale)`` for similarity logits, clamped from above.

    The clamp acts on the exponential in the forward pass, so once the scale reaches ``max_scale``
    its gradient is zero and it stays there, as in CLIP.

    Args:
        init_scale: the scale (1 / temperature) at initialisation; must be positive.
        max_scale: the largest scale ``forward`` returns; must be at least ``init_scale``.
    """

    def __init__(self, *, init_scale: float = DEFAULT_INIT_SCALE, max_scale: float = DEFAULT_MAX_SCALE) -> None:
        super().__init__()
        if not 0.0 < init_scale <= max_scale:
            raise ValueError(f"need 0 < init_scale ({init_scale}) <= max_scale ({max_scale})")
        self.init_scale = init_scale
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.empty(()))  # () log of the scale
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.constant_(self.log_scale, math.log(self.init_scale))

    def forward(self) -> Tensor:
        """The current scale.

        Returns:
            () float32 (float64 if the parameter is float64) scale in (0, max_scale].
        """
        # fp32 island: exp of a bf16 log-scale near log(100) = 4.6 is off by up to 2% (8 mantissa
        # bits), and that error multiplies every logit.
        compute = torch.promote_types(self.log_scale.dtype, torch.float32)
        return self.log_scale.to(compute).exp().clamp(max=self.max_scale)

    def extra_repr(self) -> str:
        return f"init_scale={self.init_scale:.4g}, max_scale={self.max_scale:.4g}"
