"""Monotonic alignment search (MAS): the most likely monotonic, surjective alignment of text tokens
to frames, found by dynamic programming, and the durations it gives each token.

Every frame belongs to exactly one token, tokens keep their order and every token gets at least one
frame: a path from (token 0, frame 0) to (last token, last frame) that at each frame stays on its
token or moves to the next. With v[i, j] the log-likelihood of frame j under token i, the best
path's score satisfies Q[i, j] = v[i, j] + max(Q[i, j - 1], Q[i - 1, j - 1]); backtracking from the
last token at the last frame recovers the path, and a token's duration is its count of frames.

Here the recursion runs frame by frame over every token and item at once (a loop of F small numpy
operations on the host); ties go to staying on the token, as in Glow-TTS's implementation, so the path equals
the ``monotonic-align`` package's exactly (``tests/heads/test_alignment_search.py``).

``diagonal_log_prior`` is RAD-TTS's static alignment prior: for frame j of F, a beta-binomial over
the L tokens centred on the diagonal. Added to the log-likelihoods, it decides the path while the
tokens' means are still alike (at the start of training every token fits every frame equally, the
ties all stay on the first token, and the first token's mean then learns the average frame and
keeps winning: BENCHMARKS.md, "Monotonic alignment search collapses"), and fades as the means part.

References: Kim et al. 2020, Glow-TTS: A Generative Flow for Text-to-Speech via Monotonic Alignment
Search, arXiv:2005.11129 (section 3.2, algorithm 1); Badlani et al. 2021, One TTS Alignment To Rule
Them All, arXiv:2108.10447 (section 2.3, the beta-binomial prior).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor


def maximum_path(log_likelihood: Tensor, mask: Tensor) -> Tensor:
    """The most likely monotonic alignment of each item.

    Args:
        log_likelihood: (B, L, F) v[b, i, j], the log-likelihood of frame j under token i (higher is better).
        mask: (B, L, F) bool, the outer product of the tokens' and frames' padding masks (real
            tokens first, then padding; the same for frames). Each item needs frames >= tokens >= 1.

    Returns:
        (B, L, F) float 0/1 path: one 1 per real frame, on real tokens only.
    """
    if log_likelihood.shape != mask.shape or log_likelihood.ndim != 3:
        raise ValueError(f"need log_likelihood and mask of one shape (B, L, F), got {tuple(log_likelihood.shape)} and {tuple(mask.shape)}")
    lengths, frames = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)  # (B,) real tokens, real frames
    if bool((lengths < 1).any() | (frames < lengths).any()):
        raise ValueError("every item needs at least one token and at least as many frames as tokens; see uniform_durations")
    # On the host, in numpy: F small steps of arrays of B x L, where torch's per-op cost made the
    # search 7.3 ms of the `generation` preset's step against 3.0 ms here (2.1 ms alone against the
    # monotonic-align package's Cython 0.9-2.2 ms: benchmarks/bench_alignment_search.py).
    # fp32 island: scores summed over up to hundreds of frames lose their ties and order in bf16.
    value = log_likelihood.detach().float().masked_fill(~mask, float("-inf")).cpu().numpy()
    batch, num_tokens, num_frames = value.shape
    by_frame = np.ascontiguousarray(value.transpose(2, 0, 1))  # (F, B, L)
    frames_np = frames.cpu().numpy()
    score = np.full((batch, num_tokens), -np.inf, dtype=np.float32)  # Q at the current frame
    score[:, 0] = by_frame[0, :, 0]
    advance = np.full((batch, num_tokens), -np.inf, dtype=np.float32)
    moved = np.zeros((num_frames, batch, num_tokens), dtype=bool)  # came from token i - 1
    for j in range(1, num_frames):
        advance[:, 1:] = score[:, :-1]  # Q[i - 1, j - 1]
        np.greater(advance, score, out=moved[j])  # strictly better: ties stay on the token
        updated = np.maximum(advance, score) + by_frame[j]
        live = j < frames_np  # items past their end keep their score
        score[live] = updated[live]
    path = np.zeros((batch, num_tokens, num_frames), dtype=np.float32)
    index = lengths.cpu().numpy() - 1  # (B,) every real path ends on the last real token
    rows = np.arange(batch)
    for j in range(num_frames - 1, -1, -1):
        inside = j < frames_np  # (B,)
        path[rows[inside], index[inside], j] = 1.0
        index = index - (moved[j, rows, index] & inside)
    return torch.from_numpy(path).to(log_likelihood.device)


def uniform_durations(lengths: Tensor, frames: Tensor, num_tokens: int) -> Tensor:
    """(B, L) float durations splitting each item's frames evenly over its tokens (some get 0 when
    frames < tokens): the fallback for items MAS cannot align. ``lengths``, ``frames``: (B,) long."""
    positions = torch.arange(num_tokens + 1, device=lengths.device)  # (L + 1,)
    edges = (positions[None, :] * frames[:, None] // lengths.clamp(min=1)[:, None]).clamp(max=frames[:, None])  # (B, L + 1)
    durations = (edges[:, 1:] - edges[:, :-1]).float()
    return durations.where(positions[None, 1:] <= lengths[:, None], 0.0)


def gaussian_log_likelihood(means: Tensor, frames: Tensor) -> Tensor:
    """v[b, i, j] = -||frames[b, j] - means[b, i]||^2 / 2: unit-variance Gaussian log-likelihoods
    up to a constant (Glow-TTS's prior with sigma fixed at 1, as Grad-TTS).

    Args:
        means: (B, L, M) each token's mean frame; frames: (B, F, M).

    Returns:
        (B, L, F) float32.
    """
    means, frames = means.float(), frames.float()  # fp32 island: a difference of large squared norms
    cross = torch.einsum("blm,bfm->blf", means, frames)
    return cross - 0.5 * means.square().sum(-1)[:, :, None] - 0.5 * frames.square().sum(-1)[:, None, :]


def diagonal_log_prior(lengths: Tensor, frames: Tensor, num_tokens: int, num_frames: int, *, scaling: float = 1.0) -> Tensor:
    """(B, L, F) log P(token i | frame j): a beta-binomial over each item's tokens 0..L_b - 1 with
    alpha = scaling * j and beta = scaling * (F_b - j + 1) for frame j = 1..F_b, so frame j's mode
    lies near token (L_b - 1) j / F_b (Badlani et al. 2021). 0 outside the item's tokens and frames.

    With n = L_b - 1, log P(k | j) = log C(n, k) + lgamma(k + alpha) + lgamma(n - k + beta)
    - lgamma(alpha) - lgamma(beta) + lgamma(alpha + beta) - lgamma(n + alpha + beta), and alpha + beta
    = scaling * (F_b + 1) does not depend on j. The two terms of size (B, L, F) are both
    lgamma(m + scaling * i) for whole m and i (m = k, i = j; m = n - k, i = F_b - j + 1), so they are
    read from one cached table of those values instead of computed per item: 2.4-2.9 ms instead of
    6.5-6.9 ms for 64 items of up to 40 states and 141 frames, equal values (1.6-2.9 ms against
    scipy's ``betabinom.logpmf`` item by item at 30.5-31.4 ms: ``benchmarks/bench_alignment_search.py``).

    Args:
        lengths, frames: (B,) long, each item's real tokens and frames.
        num_tokens, num_frames: L and F, the padded sizes.
        scaling: the prior's concentration (RAD-TTS: 1); larger keeps the path closer to the diagonal.
    """
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    device = lengths.device
    # float64 island: lgamma of a few hundred, differenced, loses the small log-probabilities in fp32.
    table = _lgamma_table(num_tokens, num_frames + 1, float(scaling), str(device))  # (>= L, >= F + 2)
    k = torch.arange(num_tokens, device=device)[None, :, None]  # (1, L, 1)
    j = torch.arange(1, num_frames + 1, device=device)[None, None, :]  # (1, 1, F)
    n, count = (lengths - 1)[:, None, None], frames[:, None, None]  # (B, 1, 1)
    inside = (k <= n) & (j <= count)  # (B, L, F)
    n_k, rest = (n - k).clamp(min=0), (count - j + 1).clamp(min=1)  # padding: any index the table has
    per_item = table[n_k, rest]  # (B, L, F) lgamma(n - k + beta)
    per_frame = table[: num_tokens, 1 : num_frames + 1][None]  # (1, L, F) lgamma(k + alpha)
    jf, nf, total = j.double(), n.double(), scaling * (count.double() + 1.0)  # total: alpha + beta, (B, 1, 1)
    log_choose = torch.lgamma(nf + 1.0) - torch.lgamma(k.double() + 1.0) - torch.lgamma(n_k.double() + 1.0)  # (B, L, 1)
    beta = (scaling * (count.double() - jf + 1.0)).clamp(min=scaling)  # (B, 1, F)
    per_column = torch.lgamma(total) - torch.lgamma(nf + total) - torch.lgamma(scaling * jf) - torch.lgamma(beta)  # (B, 1, F)
    log_prior = log_choose + per_frame + per_item + per_column
    return log_prior.where(inside, 0.0).float()


@functools.lru_cache(maxsize=8)
def _table(rows: int, cols: int, scaling: float, device: str) -> Tensor:
    m = torch.arange(rows, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(cols, dtype=torch.float64, device=device)[None, :]
    return torch.lgamma(m + scaling * i).where(m + i > 0, 0.0)  # (rows, cols); [0, 0] (lgamma(0)) is never read


def _lgamma_table(rows: int, cols: int, scaling: float, device: str) -> Tensor:
    """lgamma(m + scaling * i) for m < rows, i <= cols at least, float64; sizes rounded up to powers
    of two, so a few tables serve every batch."""
    return _table(1 << max(rows - 1, 1).bit_length(), 1 << cols.bit_length(), scaling, device)
