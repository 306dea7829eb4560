"""Vector quantiser: nearest codebook entry, straight-through gradients, EMA codebook, dead-code restart.

References:
    van den Oord et al. 2017, Neural Discrete Representation Learning, arXiv:1711.00937
        (nearest-neighbour lookup, straight-through estimator, codebook + commitment terms, EMA
        codebook updates in appendix A.1).
    Razavi et al. 2019, Generating Diverse High-Fidelity Images with VQ-VAE-2, arXiv:1906.00446
        (EMA updates with Laplace smoothing of the cluster sizes).
    Dhariwal et al. 2020, Jukebox: A Generative Model for Music, arXiv:2005.00341
        (random restart of codes whose usage falls below a threshold, from the current encoder outputs).

Data-parallel training: the per-step counts and sums are summed over ranks before the EMA, and a
restart draws (on rank 0, broadcast) from every rank's vectors, so each rank holds the same codebook,
the one a single process would hold on the whole global batch.
    Yu et al. 2021, Vector-quantized Image Modeling with Improved VQGAN, arXiv:2110.04627
        (factorised low-dimensional code space and l2-normalised codes).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.distributed.collectives import broadcast_, gather_rows, sum_over_ranks
from polymodal.distributed.process import is_main
from polymodal.losses.vq import codebook_loss, commitment_loss

logger = logging.getLogger(__name__)

# A code whose smoothed usage count is below this many vectors per step counts as dead.
DEFAULT_DEAD_THRESHOLD = 1.0


@dataclasses.dataclass(frozen=True)
class QuantizerOutput:
    """What one pass through a ``VectorQuantizer`` returns.

    Attributes:
        quantized: (..., dim) the chosen codes, projected back to ``dim``. Its values are exactly
            ``decode_indices(indices)`` (with the codebook as it was during the pass); its gradient
            flows to the inputs unchanged (straight-through).
        indices: (...) long, the chosen code of each input vector, in [0, K).
        losses: unweighted loss terms by name: ``commitment`` always, ``codebook`` only when the
            codebook learns by gradient (``ema=False``); with EMA the codebook has no gradient.
        stats: detached scalars of this batch: ``perplexity`` (exp of the entropy of code usage,
            between 1 and K), ``code_usage`` (share of the K codes chosen at least once) and
            ``dead_restarted`` (codes restarted after this pass; 0 outside training).
    """

    quantized: Tensor
    indices: Tensor
    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


def squared_distances(inputs: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distances from every input to every code, from one matmul.

    ``||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2``; ``addmm`` fuses the ``||e||^2`` row and the scaled
    product so the (N, K) matrix is written once, then ``||x||^2`` is added in place.

    Args:
        inputs: (N, D) vectors.
        codebook: (K, D) codes.

    Returns:
        (N, K) float32 squared distances (may be slightly negative from rounding for near-equal pairs).
    """
    # fp32 island: x.e and ||x||^2 are large and nearly cancel; in bf16 the argmin is noise.
    inputs, codebook = inputs.float(), codebook.float()
    code_sq = codebook.square().sum(dim=1)  # (K,)
    distances = torch.addmm(code_sq.unsqueeze(0), inputs, codebook.t(), alpha=-2.0)  # (N, K)
    return distances.add_(inputs.square().sum(dim=1, keepdim=True))  # + (N, 1) -> (N, K)


def codebook_usage(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Perplexity and share of codes used, from chosen indices.

    Args:
        indices: (...) long code indices (a batch, or every code of a test split).
        num_codes: K, the codebook size.

    Returns:
        perplexity: () float64, ``exp(-sum p log p)`` of the code histogram: 1 when one code takes
            everything, K when all codes are used equally.
        usage: () float64, share of the K codes chosen at least once.
    """
    return _histogram_stats(torch.bincount(indices.reshape(-1), minlength=num_codes))


def _histogram_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(K,) code counts -> (perplexity, share used), both () float64."""
    counts = counts.double()  # diagnostics in float64
    probs = counts / counts.sum().clamp(min=1.0)
    entropy = -(probs * torch.log(probs.clamp(min=torch.finfo(torch.float64).tiny))).sum()
    return entropy.exp(), (counts > 0).double().mean()


class VectorQuantizer(nn.Module):
    """Maps each ``dim``-wide vector to its nearest of K codes.

    The codebook lives in a ``code_dim``-wide code space; when ``code_dim != dim`` linear projections
    lead in and out (factorised codes, arXiv:2110.04627). With ``cosine`` the vectors and codes are
    l2-normalised, so the nearest code is the most similar in direction.

    With ``ema`` the codebook is a buffer moved by exponential moving averages of the vectors
    assigned to each code (with Laplace smoothing of the counts); otherwise it is a parameter learned
    through the ``codebook`` loss. Either way a usage count per code is kept as an EMA, and with
    ``restart_dead`` every code whose count falls below ``dead_threshold`` is moved onto a random
    encoder output of the current batch (after the batch has been quantised).

    Args:
        dim: width of the input vectors (wiring: the encoder's output channels).
        num_codes: K, the codebook size.
        code_dim: width of the code space; None uses ``dim`` (no projections).
        ema: update the codebook by EMA instead of by gradient.
        decay: EMA decay of the codebook statistics and of the usage counts.
        eps: Laplace smoothing added to each EMA count so no code divides by zero.
        cosine: l2-normalise vectors and codes (cosine-similarity lookup).
        restart_dead: restart codes whose usage count falls below ``dead_threshold``.
        dead_threshold: usage count (vectors per step, EMA) under which a code is dead.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_codes: int = 512,
        code_dim: int | None = None,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        cosine: bool = False,
        restart_dead: bool = True,
        dead_threshold: float = DEFAULT_DEAD_THRESHOLD,
    ) -> None:
        super().__init__()
        if dim < 1 or num_codes < 1:
            raise ValueError(f"dim ({dim}) and num_codes ({num_codes}) must be positive")
        if code_dim is not None and code_dim < 1:
            raise ValueError(f"code_dim must be positive or None, got {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps < 0.0 or dead_threshold < 0.0:
            raise ValueError(f"eps ({eps}) and dead_threshold ({dead_threshold}) must be >= 0")
        self.dim = dim
        self.num_codes = num_codes
        self.code_dim = code_dim or dim
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.cosine = cosine
        self.restart_dead = restart_dead
        self.dead_threshold = dead_threshold

        projected = self.code_dim != dim
        self.project_in = nn.Linear(dim, self.code_dim) if projected else nn.Identity()
        self.project_out = nn.Linear(self.code_dim, dim) if projected else nn.Identity()

        codebook = torch.empty(num_codes, self.code_dim)  # (K, code_dim)
        if ema:
            self.register_buffer("codebook", codebook)
            # Running sum of the vectors assigned to each code; codebook = code_sum / smoothed count.
            self.register_buffer("code_sum", torch.empty(num_codes, self.code_dim))  # (K, code_dim)
        else:
            self.codebook = nn.Parameter(codebook)
        # EMA of how many vectors chose each code per step; drives dead-code restarts (and EMA).
        self.register_buffer("cluster_size", torch.empty(num_codes))  # (K,)
        self.init_weights()

    def init_weights(self) -> None:
        """Small codes, uniform in [-1/K, 1/K]; with ``restart_dead`` every code no vector chose in the
        first training step is moved onto a real encoder output right after it (a data init)."""
        with torch.no_grad():
            self.codebook.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
            if self.cosine:
                self.codebook.copy_(F.normalize(self.codebook, dim=-1))
            # A count of 1 per code: the codebook equals code_sum / count from the start, and a code
            # that no vector chooses in the first step falls below the default threshold at once.
            self.cluster_size.fill_(1.0)
            if self.ema:
                self.code_sum.copy_(self.codebook)
            for proj in (self.project_in, self.project_out):
                if isinstance(proj, nn.Linear):
                    proj.reset_parameters()

    @torch.no_grad()
    def load_codebook(self, codes: Tensor) -> None:
        """Set the codebook (e.g. from k-means) and reset its statistics to a count of 1 per code.

        Args:
            codes: (K, code_dim) new codes.
        """
        if codes.shape != self.codebook.shape:
            raise ValueError(f"codes must have shape {tuple(self.codebook.shape)}, got {tuple(codes.shape)}")
        codes = F.normalize(codes, dim=-1) if self.cosine else codes
        self.codebook.copy_(codes)
        self.cluster_size.fill_(1.0)
        if self.ema:
            self.code_sum.copy_(self.codebook)

    def codes(self) -> Tensor:
        """The codebook as used for lookup: (K, code_dim), l2-normalised when ``cosine``."""
        # A learned (gradient) codebook drifts off the unit sphere, so it is normalised at use.
        return F.normalize(self.codebook, dim=-1) if self.cosine and not self.ema else self.codebook

    def _to_code_space(self, inputs: Tensor) -> Tensor:
        """(..., dim) -> (N, code_dim) float32 vectors ready for lookup."""
        if inputs.shape[-1] != self.dim:
            raise ValueError(f"expected inputs of width {self.dim} in the last axis, got shape {tuple(inputs.shape)}")
        vectors = self.project_in(inputs.reshape(-1, self.dim))  # (..., dim) -> (N, code_dim)
        # fp32 island: lookup, losses and EMA statistics are computed in float32 whatever the autocast.
        vectors = vectors.float()
        return F.normalize(vectors, dim=-1) if self.cosine else vectors

    def _nearest(self, vectors: Tensor, codebook: Tensor) -> Tensor:
        """(N, code_dim), (K, code_dim) -> (N,) index of the nearest code."""
        with torch.autocast(vectors.device.type, enabled=False):
            if self.cosine:
                # On the unit sphere ||x - e||^2 = 2 - 2 x.e: the nearest code has the largest dot product.
                return (vectors @ codebook.float().t()).argmax(dim=1)  # (N, K) -> (N,)
            return squared_distances(vectors, codebook).argmin(dim=1)  # (N, K) -> (N,)

    @torch.no_grad()
    def encode(self, inputs: Tensor) -> Tensor:
        """Indices of the nearest codes, with no state change.

        Args:
            inputs: (..., dim) vectors.

        Returns:
            (...) long code indices.
        """
        vectors = self._to_code_space(inputs)
        return self._nearest(vectors, self.codes()).reshape(inputs.shape[:-1])

    def decode_indices(self, indices: Tensor) -> Tensor:
        """The quantized vectors for given code indices.

        Args:
            indices: (...) long code indices in [0, K).

        Returns:
            (..., dim) codes projected out of code space; equal to ``forward(x).quantized`` for the
            indices that ``forward(x)`` chose, as long as the codebook has not moved since.
        """
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be integer, got {indices.dtype}")
        codes = F.embedding(indices, self.codes())  # (...) -> (..., code_dim)
        return self.project_out(codes)  # (..., code_dim) -> (..., dim)

    def forward(self, inputs: Tensor) -> QuantizerOutput:
        """Quantize; in training mode, then update the codebook statistics and restart dead codes.

        Args:
            inputs: (..., dim) vectors (any leading shape).

        Returns:
            A ``QuantizerOutput``; see its attributes for shapes.
        """
        vectors = self._to_code_space(inputs)  # (N, code_dim) fp32
        codebook = self.codes()  # (K, code_dim)
        indices = self._nearest(vectors.detach(), codebook.detach())  # (N,)
        chosen = F.embedding(indices, codebook)  # (N, code_dim); differentiable w.r.t. a learned codebook

        losses = {"commitment": commitment_loss(vectors, chosen)}
        if not self.ema:
            losses["codebook"] = codebook_loss(vectors, chosen)
        # Straight-through: the value is exactly the code (x - sg[x] is exactly 0 in floating point,
        # unlike x + sg[e - x]), and the gradient reaches x unchanged.
        quantized = chosen.detach() + (vectors - vectors.detach())  # (N, code_dim)
        quantized = self.project_out(quantized.to(inputs.dtype))  # (N, code_dim) -> (N, dim)

        counts = torch.bincount(indices, minlength=self.num_codes)  # (K,)
        perplexity, usage = _histogram_stats(counts)
        restarted = 0
        if self.training:
            restarted = self._update(vectors.detach(), indices, counts.to(vectors.dtype))
        stats = {
            "perplexity": perplexity.float(),
            "code_usage": usage.float(),
            "dead_restarted": torch.tensor(float(restarted)),
        }
        leading = inputs.shape[:-1]
        return QuantizerOutput(
            quantized=quantized.reshape(*leading, self.dim),  # (N, dim) -> (..., dim)
            indices=indices.reshape(leading),  # (N,) -> (...)
            losses=losses,
            stats=stats,
        )

    @torch.no_grad()
    def _update(self, vectors: Tensor, indices: Tensor, counts: Tensor) -> int:
        """EMA statistics and codebook (if ``ema``), then dead-code restart; returns codes restarted.

        Args:
            vectors: (N, code_dim) fp32 detached code-space inputs of this batch.
            indices: (N,) their chosen codes.
            counts: (K,) how many vectors chose each code.
        """
        counts = sum_over_ranks(counts)  # the global batch's counts (this rank's alone in one process)
        weight = 1.0 - self.decay
        # lerp_(new, 1 - decay) is decay * old + (1 - decay) * new.
        self.cluster_size.lerp_(counts, weight)
        if self.ema:
            # Per-code sums of the assigned vectors; scatter_add_ with a broadcast index is many times
            # faster than index_add_ on CPU and never builds the (N, K) one-hot matrix.
            rows = indices.unsqueeze(1).expand_as(vectors)  # (N,) -> (N, code_dim)
            sums = torch.zeros_like(self.code_sum).scatter_add_(0, rows, vectors)  # (K, code_dim)
            sums = sum_over_ranks(sums)
            self.code_sum.lerp_(sums, weight)
            # Laplace smoothing (arXiv:1906.00446): never divide by a zero count, keep the total mass.
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total  # (K,)
            codebook = self.code_sum / smoothed.unsqueeze(1)  # (K, code_dim)
            self.codebook.copy_(F.normalize(codebook, dim=-1) if self.cosine else codebook)
        if not self.restart_dead:
            return 0
        return self._restart_dead(vectors)

    @torch.no_grad()
    def _restart_dead(self, vectors: Tensor) -> int:
        """Move every code with a usage count under the threshold onto a random vector of this batch.

        Args:
            vectors: (N, code_dim) fp32 detached code-space vectors of the current batch (this
                rank's; the draw is from every rank's, made on rank 0 and broadcast).
        """
        dead = self.cluster_size < self.dead_threshold  # (K,) the same on every rank: synced counts
        num_dead = int(dead.sum())
        if num_dead == 0:
            return 0
        vectors = gather_rows(vectors)  # (N_all, code_dim) in rank order, the global batch's order
        num_vectors = vectors.shape[0]
        pick = torch.empty(num_dead, dtype=torch.long, device=vectors.device)
        if is_main():  # one draw for all ranks (rank 0's RNG is a single process's)
            if num_vectors >= num_dead:  # distinct samples when the batch has enough vectors
                pick = torch.randperm(num_vectors, device=vectors.device)[:num_dead]
            else:
                pick = torch.randint(num_vectors, (num_dead,), device=vectors.device)
        samples = vectors[broadcast_(pick)]  # (num_dead, code_dim)
        self.codebook[dead] = samples.to(self.codebook.dtype)
        # A fresh code starts at the threshold: it survives only if at least that many vectors per
        # step (on average) choose it; otherwise it is restarted again on the next step.
        self.cluster_size[dead] = self.dead_threshold
        if self.ema:
            self.code_sum[dead] = samples * self.dead_threshold
        logger.debug("restarted %d dead codes of %d", num_dead, self.num_codes)
        return num_dead
