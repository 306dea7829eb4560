"""Modality-aware sparse mixture of experts: a top-k routed set of SwiGLU experts that replaces a
transformer block's feed-forward.

Experts form groups: ``num_shared_experts`` shared by every token, then ``num_private_experts``
per modality (in ``Modality`` order, the order of ``modality.MODALITY_INDEX``). Expert
index layout: ``[shared 0..S-1][image private][text private][audio private]``. A private expert
only ever receives tokens of its modality: the router's logits of the experts a token may not use
are -inf before the top-k, so they get probability zero. Tokens of no modality (specials, padding;
modality id -1) may use the shared experts only, hence ``num_shared_experts >= top_k``.

The router reads the token plus a learned modality embedding (a zero vector for modality -1), so it
can route by modality as well as by content. Its logits and softmax are an fp32 island: under
bf16 autocast nearby logits would round to equal values and flip top-k choices between steps, and
the z-loss squares the log-sum-exp (Zoph et al. 2022, arXiv:2202.08906, section 3).

Gates: the softmax probabilities of the chosen experts, renormalised over the k choices when k > 1
(GShard, Lepikhin et al. 2020, arXiv:2006.16668); with k = 1 the raw probability, as in Switch
(Fedus et al. 2021, arXiv:2101.03961), so the router still learns from the output.

Capacity: expert e processes at most ``ceil(capacity_factor * L_e)`` assignments, where ``L_e`` is
its load if every token spread its k choices uniformly over the experts it may use (without private
experts this is the usual ``k * T / E``). Assignments beyond it are dropped: they add nothing and
the residual stream carries the token on. First choices are served before second choices, and
within one rank earlier tokens first (the priority of ST-MoE / GShard). ``capacity_factor=None``
drops nothing.

Dispatch is grouped: the T * k assignments are sorted by expert, each expert runs one SwiGLU (one
fused input matmul, one output matmul) on its contiguous slice, and the weighted results are added
back per token. Compute is k/E of running every expert on every token. Each slice is padded with
zero rows to a multiple of ``SLICE_MULTIPLE`` (their outputs are dropped): the slices' sizes change
every step, and oneDNN builds a new bf16 matmul kernel for every new shape (about 2 ms each on a
2-core Xeon with AMX, where unrounded slices made the step's matmuls take 8x as long as the dense step's;
BENCHMARKS.md, "The modality MoE's step").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.distributed.process import trains_across_ranks
from polymodal.layers.mlp import INIT_STD, SwiGLU
from polymodal.losses.moe import load_balancing_loss, router_z_loss
from polymodal.modality import Modality

MODALITIES = tuple(Modality)  # modality id i is MODALITIES[i], the rows of MODALITY_INDEX
NO_MODALITY = -1  # the modality id of tokens that belong to no modality (BOS, SEP, padding)
SLICE_MULTIPLE = 64  # an expert's slice of assignments is padded to a multiple of this (shapes repeat)


def check_moe_settings(
    *, num_shared_experts: int, num_private_experts: int, top_k: int, capacity_factor: float | None
) -> None:
    """Raise a ValueError naming the first bad setting (``"top_k: ..."``)."""
    for name, value, low in (
        ("num_shared_experts", num_shared_experts, 1),
        ("num_private_experts", num_private_experts, 0),
        ("top_k", top_k, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if top_k > num_shared_experts:
        raise ValueError(
            f"top_k: {top_k} exceeds num_shared_experts {num_shared_experts}; tokens of no modality may only "
            "use shared experts, so raise num_shared_experts or lower top_k"
        )
    if capacity_factor is not None and (
        isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor: expected a number > 0 or null (no limit), got {capacity_factor!r}")


@dataclasses.dataclass(frozen=True)
class Routing:
    """One layer's routing of T tokens over E experts.

    Attributes:
        logits: (T, E) router logits (fp32, or float64 for float64 tokens), -inf where the token
            may not use the expert.
        probs: (T, E) softmax of ``logits``.
        expert: (T, k) long, the chosen experts, best first.
        gates: (T, k) weights of the chosen experts' outputs, in the dtype of ``probs``.
    """

    logits: Tensor
    probs: Tensor
    expert: Tensor
    gates: Tensor


@dataclasses.dataclass(frozen=True)
class RoutingRecord:
    """What one MoE layer reports for one forward.

    Attributes:
        layer: the block index.
        load_balance: () Switch load-balancing loss (``losses.moe.load_balancing_loss``).
        router_z: () ST-MoE router z-loss.
        routed: (M + 1, E) long, assignments per token modality (last row: no modality) and expert,
            before capacity.
        kept: (M + 1, E) long, the routed assignments the experts processed (within capacity).
        dropped_tokens: () long, tokens all of whose k assignments were dropped.
        num_tokens: T.
    """

    layer: int
    load_balance: Tensor
    router_z: Tensor
    routed: Tensor
    kept: Tensor
    dropped_tokens: Tensor
    num_tokens: int


class MoEAux:
    """Collects the records of every MoE layer a forward (or several) runs through.

    The backbone's ``forward(..., aux=MoEAux())`` fills it; the caller reads ``losses()`` and
    ``stats()``. A fresh collector per training step keeps the module itself stateless.
    """

    def __init__(self) -> None:
        self.records: list[RoutingRecord] = []

    def add(self, record: RoutingRecord) -> None:
        self.records.append(record)

    def losses(self) -> dict[str, Tensor]:
        """``moe_load_balance`` and ``moe_router_z``, each the mean over the recorded layer calls."""
        if not self.records:
            return {}
        return {
            "moe_load_balance": torch.stack([r.load_balance for r in self.records]).mean(),
            "moe_router_z": torch.stack([r.router_z for r in self.records]).mean(),
        }

    def stats(self) -> dict[str, float]:
        """Summed over the records: ``moe_dropped_fraction`` (dropped / routed assignments),
        ``moe_dropped_tokens`` (tokens with every assignment dropped, per token-layer pass) and
        ``moe_usage_<modality>_e<j>``, the fraction of that modality's routed assignments sent to expert j."""
        if not self.records:
            return {}
        routed = torch.stack([r.routed for r in self.records]).sum(dim=0).double()  # (M + 1, E)
        kept = torch.stack([r.kept for r in self.records]).sum(dim=0).double()
        dropped_tokens = torch.stack([r.dropped_tokens for r in self.records]).sum().item()
        stats = {
            "moe_dropped_fraction": (1 - kept.sum() / routed.sum().clamp(min=1)).item(),
            "moe_dropped_tokens": float(dropped_tokens) / sum(r.num_tokens for r in self.records),
        }
        usage = routed / routed.sum(dim=1, keepdim=True).clamp(min=1)  # (M + 1, E) rows sum to one
        for i, modality in enumerate(MODALITIES):
            if routed[i].sum() > 0:
                stats.update({f"moe_usage_{modality}_e{j}": usage[i, j].item() for j in range(usage.shape[1])})
        return stats


class ModalityMoE(nn.Module):
    """Top-k routed SwiGLU experts with shared and per-modality private groups.

    Args:
        dim: token width D.
        dim_hidden: each expert's SwiGLU hidden width.
        num_shared_experts: experts every token may use (>= top_k).
        num_private_experts: experts per modality that only that modality's tokens may use.
        top_k: experts per token.
        capacity_factor: headroom over the uniform load per expert; None never drops.
        bias: biases in the experts' projections.
        dropout: dropout on the experts' hidden activations.
        layer_index: the block this layer sits in (named in its records).
    """

    def __init__(
        self,
        dim: int,
        dim_hidden: int,
        *,
        num_shared_experts: int = 4,
        num_private_experts: int = 0,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        bias: bool = False,
        dropout: float = 0.0,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        check_moe_settings(
            num_shared_experts=num_shared_experts,
            num_private_experts=num_private_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
        )
        self.num_shared_experts = num_shared_experts
        self.num_private_experts = num_private_experts
        self.num_experts = num_shared_experts + num_private_experts * len(MODALITIES)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.layer_index = layer_index
        self.experts = nn.ModuleList(
            SwiGLU(dim, dim_hidden, bias=bias, dropout=dropout) for _ in range(self.num_experts)
        )
        self.router = nn.Linear(dim, self.num_experts, bias=False)
        self.modality_embed = nn.Embedding(len(MODALITIES), dim)

    def init_weights(self, *, std: float = INIT_STD, out_std: float = INIT_STD) -> None:
        """Experts as the dense SwiGLU; router and modality embedding N(0, std)."""
        for expert in self.experts:
            expert.init_weights(std=std, out_std=out_std)
        nn.init.trunc_normal_(self.router.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.modality_embed.weight, std=std, a=-3 * std, b=3 * std)

    def allowed(self, device: torch.device) -> Tensor:
        """(M + 1, E) bool: may a token of modality row m (row M: no modality) use expert e.

        Built on each call rather than kept as a buffer: a buffer would hold garbage after a
        meta-device construction and ``to_empty``, and this costs two tiny kernels.
        """
        expert = torch.arange(self.num_experts, device=device)  # (E,)
        private_of = (expert - self.num_shared_experts) // max(self.num_private_experts, 1)  # (E,) modality row
        group = torch.where(expert < self.num_shared_experts, NO_MODALITY, private_of)  # (E,) -1 = shared
        rows = torch.arange(len(MODALITIES) + 1, device=device)  # (M + 1,)
        return (group[None, :] == NO_MODALITY) | (group[None, :] == rows[:, None])

    def forward(self, x: Tensor, *, modality_ids: Tensor | None = None, aux: MoEAux | None = None) -> Tensor:
        """Route every token to its top-k experts and sum their gated outputs.

        Args:
            x: (..., D) tokens.
            modality_ids: (...) long, each token's row of ``MODALITY_INDEX``, -1 for none; None
                means every token has no modality (shared experts only).
            aux: when given, this call's losses and routing counts are added to it.

        Returns:
            (..., D); a token whose every assignment was dropped gets zeros.
        """
        tokens = x.reshape(-1, x.shape[-1])  # (..., D) -> (T, D)
        rows = self.modality_rows(modality_ids, x)  # (T,) in [0, M], M = no modality
        routing = self.route(tokens, rows)
        out, kept = self.dispatch(tokens, routing, rows)
        if aux is not None:
            aux.add(self._record(routing, rows, kept))
        return out.reshape(x.shape)

    def modality_rows(self, modality_ids: Tensor | None, x: Tensor) -> Tensor:
        """(T,) long: the modality id per token, with -1 mapped to row M (the no-modality row)."""
        if modality_ids is None:
            return torch.full((x[..., 0].numel(),), len(MODALITIES), dtype=torch.long, device=x.device)
        if modality_ids.shape != x.shape[:-1]:
            raise ValueError(f"modality_ids must have shape {tuple(x.shape[:-1])}, got {tuple(modality_ids.shape)}")
        ids = modality_ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < NO_MODALITY or int(ids.max()) >= len(MODALITIES)):
            raise ValueError(f"modality_ids must lie in [-1, {len(MODALITIES) - 1}] (MODALITY_INDEX rows, -1 = none)")
        return torch.where(ids == NO_MODALITY, len(MODALITIES), ids)

    def route(self, tokens: Tensor, rows: Tensor) -> Routing:
        """Top-k routing of (T, D) tokens whose modality rows are ``rows`` (T,)."""
        # fp32 island (see the module docstring): autocast off, router weights and inputs in fp32
        # (float64 stays float64).
        compute = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            embed = F.pad(self.modality_embed.weight, (0, 0, 0, 1)).to(compute)  # (M + 1, D), last row zero
            logits = F.linear(tokens.to(compute) + embed[rows], self.router.weight.to(compute))  # (T, E)
            logits = logits.masked_fill(~self.allowed(tokens.device)[rows], float("-inf"))
            probs = logits.softmax(dim=-1)  # (T, E), exactly zero on forbidden experts
            # Top-k of the logits, not the probabilities: a probability may underflow to the zero of
            # a forbidden expert, a finite logit never ties with -inf.
            expert = logits.topk(self.top_k, dim=-1).indices  # (T, k)
            top_probs = probs.gather(1, expert)  # (T, k)
            gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_probs
        return Routing(logits=logits, probs=probs, expert=expert, gates=gates)

    def capacity(self, rows: Tensor) -> Tensor:
        """(E,) long: how many assignments each expert may process for tokens of modality ``rows`` (T,)."""
        counts = torch.bincount(rows, minlength=len(MODALITIES) + 1).double()  # (M + 1,) tokens per row
        allowed = self.allowed(rows.device).double()  # (M + 1, E)
        uniform_load = self.top_k * (counts[:, None] * allowed / allowed.sum(dim=1, keepdim=True)).sum(dim=0)  # (E,)
        # The small slack keeps an exact integer load (e.g. 2.0 * 4 tokens = 8.0) from ceiling to 9.
        return torch.ceil(self.capacity_factor * uniform_load - 1e-9).long()

    def dispatch(self, tokens: Tensor, routing: Routing, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Run each expert once on its assignments, sorted by expert, and add them back per token.

        Args:
            tokens: (T, D).
            routing: the routing of these tokens.
            rows: (T,) their modality rows (for the capacity).

        Returns:
            output (T, D), and kept (T, k) bool: which assignments were within capacity.
        """
        num_tokens, top_k = routing.expert.shape
        # Assignment a = j * T + t (rank-major), so a stable sort by expert serves every first choice
        # before any second choice and, within a rank, earlier tokens first.
        expert_of = routing.expert.T.reshape(-1)  # (k * T,)
        token_of = torch.arange(num_tokens, device=tokens.device).repeat(top_k)  # (k * T,)
        order = torch.sort(expert_of, stable=True).indices  # (k * T,) grouped by expert
        counts = torch.bincount(expert_of, minlength=self.num_experts)  # (E,)
        starts = counts.cumsum(0) - counts  # (E,) first sorted slot of each expert
        position = torch.arange(order.numel(), device=tokens.device) - starts[expert_of[order]]  # rank within expert
        if self.capacity_factor is None:
            keep_sorted = torch.ones_like(order, dtype=torch.bool)
            kept_counts = counts
        else:
            limit = self.capacity(rows)  # (E,)
            keep_sorted = position < limit[expert_of[order]]
            kept_counts = torch.minimum(counts, limit)
        chosen = order[keep_sorted]  # (A,) kept assignments, still grouped by expert
        kept_token = token_of[chosen]  # (A,) the token of each kept assignment
        # index_select, not tensor indexing: its backward is one index_add, not an accumulating index_put.
        inputs = tokens.index_select(0, kept_token)  # (A, D)
        outputs = torch.cat(
            [_run_padded(expert, part) for expert, part in zip(self.experts, inputs.split(kept_counts.tolist()))]
        )  # (A, D): one SwiGLU per expert on its contiguous slice
        weights = routing.gates.T.reshape(-1).index_select(0, chosen).to(outputs.dtype)  # (A,)
        # Zeros in the experts' dtype (bf16 under autocast, as the dense feed-forward would return).
        out = outputs.new_zeros(tokens.shape).index_add_(0, kept_token, outputs * weights[:, None])
        kept = torch.zeros(top_k * num_tokens, dtype=torch.bool, device=tokens.device)
        kept[chosen] = True
        return out, kept.reshape(top_k, num_tokens).T  # (k * T,) -> (T, k)

    def _record(self, routing: Routing, rows: Tensor, kept: Tensor) -> RoutingRecord:
        num_rows = len(MODALITIES) + 1
        cell = rows[:, None] * self.num_experts + routing.expert  # (T, k) flat (row, expert) index
        size = num_rows * self.num_experts
        routed = torch.bincount(cell.reshape(-1), minlength=size).view(num_rows, self.num_experts)
        kept_cells = torch.bincount(cell[kept], minlength=size).view(num_rows, self.num_experts)
        return RoutingRecord(
            layer=self.layer_index,
            load_balance=load_balancing_loss(routing.probs, routing.expert, across_ranks=trains_across_ranks(self)),
            router_z=router_z_loss(routing.logits),
            routed=routed,
            kept=kept_cells,
            dropped_tokens=(~kept.any(dim=1)).sum(),
            num_tokens=rows.numel(),
        )


def _run_padded(expert: nn.Module, part: Tensor, multiple: int = SLICE_MULTIPLE) -> Tensor:
    """``expert(part)`` row by row, run on ``part`` padded with zero rows to a multiple of
    ``multiple`` so that the matmuls' shapes repeat across steps; the padding's rows are dropped."""
    rows = part.shape[0]
    padded = -(-rows // multiple) * multiple
    if padded == rows:
        return expert(part)
    return expert(F.pad(part, (0, 0, 0, padded - rows)))[:rows]
