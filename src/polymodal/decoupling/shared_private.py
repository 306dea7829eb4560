"""Shared-private factorisation (seed 003, scheme 3): each modality's pooled state splits into a
shared part, aligned across modalities, and a private part, kept independent of the shared parts.

Per modality m, with h_m the masked mean of its states (B, D):

    shared_m  = S h_m              one projection S for every modality (MISA's shared encoder)
    private_m = P_m h_m            a projection per modality
    pooled_m  = norm(F_m [shared_m; private_m])      what the heads read
    recon_m   = R_m [shared_m; private_m]            should give back h_m

Losses (unweighted; the training schedule weighs them, e.g. independence early and alignment
rising later, as seed 003 suggests), each over the items that hold the modalities involved:

* ``align_<pair>``: the shared parts of two modalities aligned by ``align``: ``info_nce`` (the
  symmetric InfoNCE of ``losses.contrastive`` on L2-normalised shared parts, with a learned
  temperature), ``dcca`` (minus the summed canonical correlations), ``vicreg`` or ``barlow_twins``
  (``losses.alignment``);
* ``independence_<m>``: private_m against shared_m, and ``independence_<pair>``: the two private
  parts against each other (MISA's difference loss covers both), by ``independence``:
  ``cross_covariance`` (squared Frobenius norm of the cross-covariance), ``hsic_linear`` or
  ``hsic_rbf`` (the unbiased HSIC of Song et al. 2012 with that kernel; ``losses.independence``);
* ``reconstruction_<m>``: the mean squared error of recon_m against h_m. The target is detached: a
  target that follows the gradient could shrink toward zero to make the loss small, where the aim
  is to keep the private part carrying what the shared part misses.

The private-first curriculum lives in the schedule (this part has no gate); ``set_progress`` is
accepted for the common interface and changes nothing.

References: Hazarika et al. 2020, MISA: Modality-Invariant and -Specific Representations for
Multimodal Sentiment Analysis, arXiv:2005.03545; Andrew et al. 2013, Deep Canonical Correlation
Analysis (ICML); Gretton et al. 2005 and Song et al. 2012 (HSIC, biased and unbiased estimators).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.decoupling import DECOUPLERS
from polymodal.decoupling.common import DecouplerOutput, both_present, check_inputs
from polymodal.layers.mlp import INIT_STD
from polymodal.layers.norms import RMSNorm
from polymodal.losses.alignment import barlow_twins, dcca, vicreg
from polymodal.losses.contrastive import info_nce
from polymodal.losses.independence import cross_covariance_penalty, hsic
from polymodal.losses.temperature import LogitScale
from polymodal.modality import MODALITY_INDEX
from polymodal.models.alignment import pair_name
from polymodal.models.sequence import masked_mean
from polymodal.modality import Modality

ALIGNMENTS = ("info_nce", "dcca", "vicreg", "barlow_twins")
INDEPENDENCE = ("cross_covariance", "hsic_linear", "hsic_rbf")
# Fewest items a loss is computed over: batch statistics need two rows, the unbiased HSIC four.
MIN_ROWS = {"cross_covariance": 2, "hsic_linear": 4, "hsic_rbf": 4}
MIN_ALIGN_ROWS = 2


@DECOUPLERS.register("shared_private")
class SharedPrivateDecoupler(nn.Module):
    """Shared and private projections of each modality's pooled state, with their losses.

    Args:
        dim: state width D.
        modalities: the model's modalities; each gets a private projection and heads.
        dim_shared: width of the shared parts; ``dim`` when None.
        dim_private: width of the private parts; ``dim`` when None.
        align: ``info_nce``, ``dcca``, ``vicreg`` or ``barlow_twins`` (``vicreg`` and
            ``barlow_twins`` compare features one to one).
        independence: ``cross_covariance``, ``hsic_linear`` or ``hsic_rbf``.
    """

    def __init__(
        self,
        dim: int,
        modalities: tuple[Modality, ...] | list[Modality],
        *,
        dim_shared: int | None = None,
        dim_private: int | None = None,
        align: str = "info_nce",
        independence: str = "cross_covariance",
    ) -> None:
        super().__init__()
        if align not in ALIGNMENTS:
            raise ValueError(f"align: unknown {align!r}; valid: {', '.join(ALIGNMENTS)}")
        if independence not in INDEPENDENCE:
            raise ValueError(f"independence: unknown {independence!r}; valid: {', '.join(INDEPENDENCE)}")
        self.dim = dim
        self.modalities = tuple(sorted(set(modalities), key=MODALITY_INDEX.__getitem__))
        self.align = align
        self.independence = independence
        self.dim_shared = dim_shared = dim if dim_shared is None else dim_shared
        dim_private = dim if dim_private is None else dim_private
        self.to_shared = nn.Linear(dim, dim_shared)
        self.to_private = nn.ModuleDict({m.value: nn.Linear(dim, dim_private) for m in self.modalities})
        self.fuse = nn.ModuleDict({m.value: nn.Linear(dim_shared + dim_private, dim) for m in self.modalities})
        self.reconstruct = nn.ModuleDict({m.value: nn.Linear(dim_shared + dim_private, dim) for m in self.modalities})
        self.out_norm = RMSNorm(dim)
        self.logit_scale = LogitScale() if align == "info_nce" else None
        self.init_weights()

    def init_weights(self) -> None:
        """Linear layers N(0, 0.02) with zero biases; the norm gain one; the temperature CLIP's 0.07."""
        linears = [self.to_shared, *self.to_private.values(), *self.fuse.values(), *self.reconstruct.values()]
        for linear in linears:
            nn.init.trunc_normal_(linear.weight, std=INIT_STD, a=-3 * INIT_STD, b=3 * INIT_STD)
            nn.init.zeros_(linear.bias)
        self.out_norm.init_weights()
        if self.logit_scale is not None:
            self.logit_scale.init_weights()

    def set_progress(self, fraction: float) -> None:
        """Accepted for the decoupler interface; this part has no curriculum of its own."""

    def forward(self, states: dict[Modality, Tensor], masks: dict[Modality, Tensor]) -> DecouplerOutput:
        """Project each modality's pooled state into shared and private parts.

        Args:
            states: per modality, (B, N_m, D) backbone states of the same B items.
            masks: per modality, (B, N_m) bool, True = real token (all False: the item lacks it).

        Returns:
            DecouplerOutput: pooled (B, D), shared (B, dim_shared) and private (B, dim_private) per
            modality present; losses ``align_<pair>``, ``independence_<m>``, ``independence_<pair>``
            and ``reconstruction_<m>``; stats ``shared_cosine_<pair>``, the mean cosine of paired
            shared parts; no token sets or attention maps.
        """
        check_inputs(states, masks, self.modalities, self.dim)
        present = [m for m in self.modalities if m in states]
        pooled, shared, private, losses = {}, {}, {}, {}
        for modality in present:
            hidden = masked_mean(states[modality], masks[modality])  # (B, D)
            shared[modality] = self.to_shared(hidden)
            private[modality] = self.to_private[modality.value](hidden)
            both = torch.cat([shared[modality], private[modality]], dim=-1)  # (B, dim_shared + dim_private)
            pooled[modality] = self.out_norm(self.fuse[modality.value](both))
            holds = masks[modality].any(dim=1)  # (B,)
            if holds.any():
                recon = self.reconstruct[modality.value](both[holds])
                losses[f"reconstruction_{modality}"] = F.mse_loss(recon, hidden[holds].detach())
            if int(holds.sum()) >= MIN_ROWS[self.independence]:
                dependence = self._independence(private[modality][holds], shared[modality][holds])
                losses[f"independence_{modality}"] = dependence
        stats: dict[str, float] = {}
        for a, b in itertools.combinations(present, 2):
            rows = both_present(masks, a, b)
            name = pair_name(a, b)
            if int(rows.sum()) >= MIN_ALIGN_ROWS:
                losses[f"align_{name}"] = self._align(shared[a][rows], shared[b][rows])
                cosine = F.cosine_similarity(shared[a][rows].double(), shared[b][rows].double(), dim=-1)
                stats[f"shared_cosine_{name}"] = cosine.mean().item()
            if int(rows.sum()) >= MIN_ROWS[self.independence]:
                losses[f"independence_{name}"] = self._independence(private[a][rows], private[b][rows])
        return DecouplerOutput(pooled, shared, private, token_sets={}, attention={}, losses=losses, stats=stats)

    def _align(self, a: Tensor, b: Tensor) -> Tensor:
        """The alignment loss between (n, dim_shared) shared parts of paired items."""
        if self.logit_scale is not None:  # align == "info_nce"
            return info_nce(F.normalize(a, dim=-1), F.normalize(b, dim=-1), self.logit_scale())
        if self.align == "dcca":
            return dcca(a, b)
        if self.align == "vicreg":
            return vicreg(a, b)
        return barlow_twins(a, b)

    def _independence(self, x: Tensor, y: Tensor) -> Tensor:
        """The dependence penalty between two (n, D') codes of the same items."""
        if self.independence == "cross_covariance":
            return cross_covariance_penalty(x, y)
        return hsic(x, y, kernel=self.independence.removeprefix("hsic_"), unbiased=True)
