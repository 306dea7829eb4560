"""Next-token choice from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Reference: Holtzman et al. 2019, The Curious Case of Neural Text Degeneration, arXiv:1904.09751
(nucleus sampling); Fan et al. 2018, Hierarchical Neural Story Generation, arXiv:1805.04833 (top-k).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row.

    Args:
        logits: (B, V).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the k most likely tokens (0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 keeps all).
        generator: the draw's; it may live on another device than ``logits`` (a CPU generator with a
            model on a GPU): the draw is then made on the generator's device, so a seed picks the
            same tokens on either.

    Returns:
        (B,) long token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # fp32: softmax over a large vocabulary under bf16 loses the tail
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    where = probs.device if generator is None else generator.device
    return torch.multinomial(probs.to(where), 1, generator=generator).squeeze(-1).to(probs.device)
