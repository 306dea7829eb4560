"""Slot attention: a few slots compete for the input tokens over several rounds.

Each round, every token's attention is a softmax over the slots (not over the tokens), so slots
compete to explain each token; each slot then reads the weighted mean of the values of the tokens
it won and is updated by a GRU cell and a residual MLP. The module is equivariant to the order of
the slots: permuting the initial slots (with their biases and frozen flags) permutes the outputs.

Two additions for typed slots (``decoupling/typed_slots.py``): a per-slot additive bias on the
attention logits (``log`` of a prior share; -inf takes the slot out of the competition) and
frozen slots, which keep their initial state.

Reference: Locatello et al. 2020, Object-Centric Learning with Slot Attention, arXiv:2006.15055
(Algorithm 1; LayerNorm on inputs and slots, no biases on the q/k/v projections, the small epsilon
in the weighted mean). The paper's MLP uses ReLU; we use GELU, as the rest of the library.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from polymodal.layers.mlp import INIT_STD, GeluMLP

# Added to each slot's total assignment before the weighted mean (Algorithm 1's epsilon): a slot
# that wins no token reads a zero update instead of 0 / 0.
ASSIGNMENT_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SlotAttentionOutput:
    """What ``SlotAttention.forward`` returns.

    Attributes:
        slots: (B, S, D) the slots after the last round.
        assignment: (B, S, N) the last round's softmax over slots, zero on padded tokens: each real
            token's column sums to one.
    """

    slots: Tensor
    assignment: Tensor


class SlotAttention(nn.Module):
    """Iterative slot attention over a token set.

    Args:
        dim: slot and token width D.
        dim_hidden: hidden width of the residual MLP.
        num_iterations: rounds of competition and update (the paper uses 3).
    """

    def __init__(self, dim: int, dim_hidden: int, *, num_iterations: int = 3) -> None:
        super().__init__()
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        self.num_iterations = num_iterations
        self.scale = 1.0 / math.sqrt(dim)
        self.input_norm = nn.LayerNorm(dim)
        self.slot_norm = nn.LayerNorm(dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = GeluMLP(dim, dim_hidden)

    def init_weights(self, *, std: float = INIT_STD) -> None:
        """LayerNorms at one and zero, projections and MLP N(0, std); the GRU keeps PyTorch's uniform init."""
        for norm in (self.input_norm, self.slot_norm, self.mlp_norm):
            norm.reset_parameters()
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        self.gru.reset_parameters()
        self.mlp.init_weights(std=std, out_std=std)

    def forward(
        self,
        tokens: Tensor,
        slots: Tensor,
        *,
        mask: Tensor | None = None,
        slot_bias: Tensor | None = None,
        frozen: Tensor | None = None,
    ) -> SlotAttentionOutput:
        """Run ``num_iterations`` rounds.

        Args:
            tokens: (B, N, D) the inputs.
            slots: (B, S, D) the initial slots.
            mask: (B, N) bool, True = real token; padded tokens are assigned to no slot. None = all real.
            slot_bias: (S,) added to every token's logit for each slot before the softmax over
                slots; -inf removes a slot from the competition. None = no bias.
            frozen: (S,) bool, slots that keep their initial state. None = none.

        Returns:
            SlotAttentionOutput with slots (B, S, D) and assignment (B, S, N).
        """
        normed = self.input_norm(tokens)
        keys, values = self.k_proj(normed), self.v_proj(normed)  # (B, N, D) each
        real = torch.ones_like(tokens[..., 0]) if mask is None else mask.to(tokens.dtype)  # (B, N)
        initial, batch, num_slots, dim = slots, *slots.shape
        assignment = tokens.new_zeros(batch, num_slots, tokens.shape[1])
        for _ in range(self.num_iterations):
            queries = self.q_proj(self.slot_norm(slots))  # (B, S, D)
            logits = torch.einsum("bsd,bnd->bsn", queries, keys) * self.scale  # (B, S, N)
            if slot_bias is not None:
                logits = logits + slot_bias.to(logits.dtype)[None, :, None]
            assignment = logits.softmax(dim=1) * real[:, None, :]  # softmax over slots; padding claims nothing
            weights = assignment / (assignment.sum(dim=-1, keepdim=True) + ASSIGNMENT_EPS)  # weighted mean over tokens
            updates = weights @ values  # (B, S, N) @ (B, N, D) -> (B, S, D)
            updated = self.gru(updates.reshape(-1, dim), slots.reshape(-1, dim)).view(batch, num_slots, dim)
            slots = updated + self.mlp(self.mlp_norm(updated))
            if frozen is not None:
                slots = torch.where(frozen[None, :, None], initial, slots)
        return SlotAttentionOutput(slots=slots, assignment=assignment)
