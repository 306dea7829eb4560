"""Per-modality query banks (seed 003, scheme 1): private learned queries per modality that read
only their modality's tokens, and a small shared bank, gated open during training.

Each private bank is a set of learned queries with its own cross-attention + MLP block (a
Q-Former block without self-attention), reading the states of its modality and nothing else: no
other modality's token is ever a key of its attention. The shared bank is one query set and one
block, applied to every modality's tokens separately with the same weights, so ``shared[m]`` lies
in one space for all modalities and a cross-modal InfoNCE on it compares views computed apart (a
bank reading all modalities at once would give one vector per item and could not embed an item
that carries one modality, as retrieval needs).

Summaries: ``private[m]`` and ``shared[m]`` are the means of the banks' outputs (B, D);
``pooled[m] = norm(private[m] + g * shared[m])`` with g the ``OpeningGate`` (0 before
``open_start``, linear to 1 at ``open_end``). While g = 0 the shared bank is closed: ``shared`` is
returned without gradient, so nothing, InfoNCE included, trains through it.

Losses: the cross-modal InfoNCE on ``shared`` stays with the caller's contrastive task. The module
returns VICReg / Barlow Twins terms on the private summaries (seed 003: their covariance /
redundancy terms keep the private branches from absorbing the other modality), each multiplied by
``private_weight`` (``train.loss_weights`` and schedules multiply them again):

* ``private_decorrelation_<pair>``: the squared Frobenius norm of the cross-covariance between two
  modalities' private summaries over the items that hold both (VICReg's covariance term taken
  across the two views; ``losses.independence.cross_covariance_penalty``);
* ``private_<m>``: ``private_loss="vicreg"``: VICReg's variance hinge and covariance term on one
  modality's private summaries (``vicreg(p, p)``: with one view twice the invariance term is zero);
  ``"barlow_twins"``: ``barlow_twins(p, p)``, whose diagonal term keeps every feature from
  collapsing and whose off-diagonal term removes redundancy. Without them decorrelation has a
  trivial solution: constant private summaries.

Four settings differ from the papers, each measured in the ``default`` preset with contrastive at
weight 1 (BENCHMARKS.md, issues 13 and 14):

* ``private_weight`` = 0.04. VICReg's variance weight (mu = 25) is set against its own invariance
  term; next to captioning losses of about 1 it is 25 times theirs, and the whole model collapsed
  (every line near 0). At 0.04 the variance term weighs 1.
* The private banks read the backbone's states without gradient (``private_backprop=False``): the
  private terms train the private banks, not the shared backbone. Through the backbone they fought
  captioning (decorrelating the image's private summary from the text's of the same items pulls on
  the states captioning reads): image->text loss stalled at 1.3 from step 150 on (plain reaches
  0.5) and image->text fell to 7.7%; without the gradient it was 76.1%.
* The value and output projections start orthogonal (the other weights at N(0, 0.02)). At N(0,
  0.02), a loss on the shared summary sent the states 0.08x the gradient the same loss on their
  masked mean does (0.93x now), and InfoNCE through the bank learnt about five times more slowly
  than through the mean against the generation losses that share the backbone.
* The queries start at N(0, 0.02), as BLIP-2's query tokens do, not at unit scale. A bank's output
  is its query plus what it read; with unit queries the constant query dominates, every item's
  summary is the same vector to 0.2-0.7% (the batch std against the batch mean, at
  initialisation), InfoNCE starts from indistinguishable items, and the private summaries stayed
  collapsed through training (std 7e-4 per feature, where VICReg's hinge has almost no
  gradient). At 0.02 the summaries vary across items as much as the masked mean does.

References: Li et al. 2023, BLIP-2 (learned queries reading a frozen encoder), arXiv:2301.12597;
Jaegle et al. 2021, Perceiver, arXiv:2103.03206; Bardes et al. 2021, VICReg, arXiv:2105.04906;
Zbontar et al. 2021, Barlow Twins, arXiv:2103.03230.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from polymodal.decoupling import DECOUPLERS
from polymodal.decoupling.common import (
    PADDING,
    SHARED_TYPE,
    AttentionMap,
    DecouplerOutput,
    GatedSummaries,
    OpeningGate,
    both_present,
    check_inputs,
    leakage_ratios,
)
from polymodal.layers.cross_attention import INIT_STD
from polymodal.layers.norms import RMSNorm
from polymodal.losses.alignment import barlow_twins, vicreg
from polymodal.losses.independence import cross_covariance_penalty
from polymodal.modality import MODALITY_INDEX
from polymodal.models.alignment import pair_name
from polymodal.modality import Modality
from polymodal.projectors.qformer import QFormerBlock

PRIVATE_LOSSES = ("vicreg", "barlow_twins")
BANK_QUERY_INIT_STD = INIT_STD  # small, so the summaries carry what the banks read (see the header)
DEFAULT_PRIVATE_WEIGHT = 0.04  # VICReg's mu = 25 times 0.04: the variance term weighs 1 (see the header)
MIN_ROWS = 2  # batch statistics (variances, covariances) need two items
# vicreg(p, p) counts the covariance term of its one view twice; half the paper's nu = 1 restores one.
SINGLE_VIEW_COVARIANCE_WEIGHT = 0.5


@DECOUPLERS.register("query_bank")
class QueryBankDecoupler(nn.Module):
    """A private query bank per modality plus a gated shared bank.

    Args:
        dim: token and query width D.
        modalities: the model's modalities; each gets a private bank.
        num_private_queries: queries in each private bank.
        num_shared_queries: queries in the shared bank.
        num_heads: cross-attention heads.
        mlp_ratio: the banks' MLP hidden width is ``mlp_ratio * dim``.
        open_start: training fraction where the shared bank starts to open.
        open_end: training fraction where it is fully open.
        private_loss: ``vicreg`` or ``barlow_twins``, the per-modality term on private summaries.
        private_weight: the factor on every private term (``private_<m>`` and
            ``private_decorrelation_<pair>``), against the task losses.
        private_backprop: let the private terms' gradients reach the backbone through the states
            the private banks read (off: they train the private banks alone).
        qk_norm: RMSNorm queries and keys per head.
    """

    def __init__(
        self,
        dim: int,
        modalities: tuple[Modality, ...] | list[Modality],
        *,
        num_private_queries: int = 8,
        num_shared_queries: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        open_start: float = 0.3,
        open_end: float = 0.6,
        private_loss: str = "vicreg",
        private_weight: float = DEFAULT_PRIVATE_WEIGHT,
        private_backprop: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if private_loss not in PRIVATE_LOSSES:
            raise ValueError(f"private_loss: unknown {private_loss!r}; valid: {', '.join(PRIVATE_LOSSES)}")
        if private_weight < 0:
            raise ValueError(f"private_weight must be >= 0, got {private_weight}")
        self.dim = dim
        self.dim_shared = dim  # width of the shared summaries
        self.modalities = tuple(sorted(set(modalities), key=MODALITY_INDEX.__getitem__))
        self.private_loss = private_loss
        self.private_weight = private_weight
        self.private_backprop = private_backprop
        self.gate = OpeningGate(open_start, open_end)
        self.private_queries = nn.ParameterDict(
            {m.value: nn.Parameter(torch.empty(num_private_queries, dim)) for m in self.modalities}
        )
        self.shared_queries = nn.Parameter(torch.empty(num_shared_queries, dim))
        settings = {
            "num_heads": num_heads,
            "dim_hidden": int(mlp_ratio * dim),
            "self_attention": False,  # queries read independently: no bank output mixes its neighbours
            "qk_norm": qk_norm,
        }
        self.private_blocks = nn.ModuleDict({m.value: QFormerBlock(dim, dim, **settings) for m in self.modalities})
        self.shared_block = QFormerBlock(dim, dim, **settings)
        self.out_norm = RMSNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Queries and blocks N(0, 0.02), residual outputs scaled by 1/sqrt(2) (two branches), but the
        cross-attention's value and output projections orthogonal."""
        for queries in [*self.private_queries.values(), self.shared_queries]:
            nn.init.normal_(queries, std=BANK_QUERY_INIT_STD)
        for block in [*self.private_blocks.values(), self.shared_block]:
            block.init_weights(out_std=INIT_STD / math.sqrt(block.num_branches))
            # The read path (values, then the output projection) starts as an isometry, so that a
            # bank begins as the attention-weighted mean of the normalised states, at the masked
            # mean's scale (see the header).
            nn.init.orthogonal_(block.cross_attn.v_proj.weight)
            nn.init.orthogonal_(block.cross_attn.o_proj.weight)
        self.out_norm.init_weights()

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1]; recomputes the shared bank's gate."""
        self.gate.set_progress(fraction)

    def forward(self, states: dict[Modality, Tensor], masks: dict[Modality, Tensor]) -> DecouplerOutput:
        """Read each modality with its private bank and with the shared bank.

        Args:
            states: per modality, (B, N_m, D) backbone states of the same B items.
            masks: per modality, (B, N_m) bool, True = real token (all False: the item lacks it).

        Returns:
            DecouplerOutput: pooled, shared and private (B, D) per modality present; token_sets
            ``private_<m>`` (B, num_private_queries, D) and ``shared_<m>`` (B, num_shared_queries, D);
            attention ``private`` (B, sum Q_m, sum N_m) over every modality's keys (zero off the
            own modality) and ``shared_<m>`` (B, num_shared_queries, N_m); losses ``private_<m>``
            and ``private_decorrelation_<pair>``; stats ``gate`` and ``leakage_<m>``.
        """
        check_inputs(states, masks, self.modalities, self.dim)
        present = [m for m in self.modalities if m in states]
        summaries = GatedSummaries(self.gate.value, self.out_norm)
        attention: dict[str, AttentionMap] = {}
        private_maps = []
        for modality in present:
            tokens, mask = states[modality], masks[modality]
            read = tokens if self.private_backprop else tokens.detach()  # see the header
            own, own_map = self._read(self.private_blocks[modality.value], self.private_queries[modality.value], read, mask)
            common, common_map = self._read(self.shared_block, self.shared_queries, tokens, mask)
            summaries.add(modality, own, common)
            key_modality = torch.where(mask, MODALITY_INDEX[modality], PADDING)  # (B, N_m)
            query_type = torch.full((common.shape[1],), SHARED_TYPE, device=common.device)
            attention[f"shared_{modality}"] = AttentionMap(common_map, query_type, key_modality)
            private_maps.append((modality, own_map, key_modality))
        attention["private"] = _block_diagonal(private_maps)
        ratios = leakage_ratios(attention["private"])
        stats = {"gate": summaries.gate, **{f"leakage_{m}": r.item() for m, r in ratios.items()}}
        return summaries.output(attention, self._private_losses(summaries.private, masks), stats)

    def _read(self, block: QFormerBlock, queries: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """One bank over one modality: outputs (B, Q, D) and head-averaged attention (B, Q, N)."""
        weights: list[Tensor] = []
        start = repeat(queries, "q d -> b q d", b=tokens.shape[0]).to(tokens.dtype)  # (B, Q, D)
        out = block(start, tokens, mask=mask, attention=weights)
        return out, weights[0].mean(dim=1)  # (B, H, Q, N) -> (B, Q, N)

    def _private_losses(self, private: dict[Modality, Tensor], masks: dict[Modality, Tensor]) -> dict[str, Tensor]:
        """``private_<m>`` per modality and ``private_decorrelation_<pair>`` per pair, over the items holding them."""
        losses: dict[str, Tensor] = {}
        for modality, summary in private.items():
            rows = summary[masks[modality].any(dim=1)]  # (B_m, D)
            if rows.shape[0] < MIN_ROWS:
                continue
            if self.private_loss == "vicreg":
                term = vicreg(rows, rows, invariance_weight=0.0, covariance_weight=SINGLE_VIEW_COVARIANCE_WEIGHT)
            else:
                term = barlow_twins(rows, rows)
            losses[f"private_{modality}"] = self.private_weight * term
        for a, b in itertools.combinations(private, 2):
            both = both_present(masks, a, b)
            if int(both.sum()) >= MIN_ROWS:
                penalty = cross_covariance_penalty(private[a][both], private[b][both])
                losses[f"private_decorrelation_{pair_name(a, b)}"] = self.private_weight * penalty
        return losses


def _block_diagonal(maps: list[tuple[Modality, Tensor, Tensor]]) -> AttentionMap:
    """One map over every modality's keys from per-modality (B, Q_m, N_m) maps: each bank's rows
    hold its weights on its own keys and exact zeros on the others."""
    widths = [weights.shape[-1] for _, weights, _ in maps]
    rows = []
    for i, (_, weights, _) in enumerate(maps):
        rows.append(F.pad(weights, (sum(widths[:i]), sum(widths[i + 1 :]))))  # (B, Q_m, sum N)
    query_type = torch.cat(
        [torch.full((weights.shape[1],), MODALITY_INDEX[m], device=weights.device) for m, weights, _ in maps]
    )
    key_modality = torch.cat([keys for _, _, keys in maps], dim=1)  # (B, sum N)
    return AttentionMap(weights=torch.cat(rows, dim=1), query_type=query_type, key_modality=key_modality)
