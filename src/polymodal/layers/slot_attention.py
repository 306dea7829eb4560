"""Slot attention: a few slots compete for the input tokens over several rounds.

Each round, every token's attention is a softmax over the slots (not over the tokens), so slots
compete to explain each token; each slot then reads the weighted mean of the values of the tokens
it won and is updated by a GRU cell and a residual MLP. The module is equivariant to the order of
the slots: permuting the initial slots (with their biases and frozen flags) permutes the outputs.

Two additions for typed slots (``decoupling/typed_slots.py``): a per-slot additive bias on the
attention logits (``log`` of a prior share; -inf takes the slot out of the competition) and
frozen slots, which keep their initial state.

Savings that leave the result unchanged: keys and values are projected for the real tokens only
(padding claims no slot, so its keys are never read); initial slots shared by every item may come
in as (S, D), and the first round then projects them once rather than once per item; and a caller
that reads only some slots (``needed``) skips the others' last update, which no later round reads.

Reference: Locatello et al. 2020, Object-Centric Learning with Slot Attention, arXiv:2006.15055
(Algorithm 1; LayerNorm on inputs and slots, no biases on the q/k/v projections, the small epsilon
in the weighted mean). The paper's MLP uses ReLU; we use GELU, as the rest of the library.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.layers.attention import TokenLayout
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
        """LayerNorms at one and zero; q/k/v projections Glorot-uniform, as in the paper (its dense
        layers' default). At N(0, 0.02) a loss on typed slots' shared summary sent the tokens
        0.14x the gradient the same loss on their masked mean does (0.37x now), and learnt
        slowly against the generation losses sharing the backbone. MLP N(0, std); the GRU keeps
        PyTorch's uniform init."""
        for norm in (self.input_norm, self.slot_norm, self.mlp_norm):
            norm.reset_parameters()
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(linear.weight)
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
        needed: Tensor | None = None,
    ) -> SlotAttentionOutput:
        """Run ``num_iterations`` rounds.

        Args:
            tokens: (B, N, D) the inputs.
            slots: (B, S, D) the initial slots, or (S, D) the same initial slots for every item
                (the first round's slot-side work, query projection and the GRU's recurrent
                matmul, then runs on S rows instead of B * S).
            mask: (B, N) bool, True = real token; padded tokens are assigned to no slot. None = all real.
            slot_bias: (S,) added to every token's logit for each slot before the softmax over
                slots; -inf removes a slot from the competition. None = no bias.
            frozen: (S,) bool, slots that keep their initial state. None = none.
            needed: (B, S) bool, the slots whose final state the caller reads. The others still
                compete in every round, but their last update (read by no later round) is skipped:
                they come back as zeros (frozen ones as their initial state). None = all.

        Returns:
            SlotAttentionOutput with slots (B, S, D) and assignment (B, S, N).
        """
        keys, values = self._keys_values(tokens, mask)  # (B, N, D) each
        real = torch.ones_like(tokens[..., 0]) if mask is None else mask.to(tokens.dtype)  # (B, N)
        initial, batch, num_slots = slots, tokens.shape[0], slots.shape[-2]
        assignment = tokens.new_zeros(batch, num_slots, tokens.shape[1])
        for round_ in range(self.num_iterations):
            # Slot-side projections first, on (S, D) rows while the slots are still shared by every item.
            queries = self.q_proj(self.slot_norm(slots)).expand(batch, -1, -1)  # (B, S, D)
            shared = slots.ndim == 2
            hidden_gates = self.hidden_gates(slots).expand(batch, -1, -1) if shared else None  # (B, S, 3D)
            logits = torch.einsum("bsd,bnd->bsn", queries, keys) * self.scale  # (B, S, N)
            if slot_bias is not None:
                logits = logits + slot_bias.to(logits.dtype)[None, :, None]
            assignment = logits.softmax(dim=1) * real[:, None, :]  # softmax over slots; padding claims nothing
            weights = assignment / (assignment.sum(dim=-1, keepdim=True) + ASSIGNMENT_EPS)  # weighted mean over tokens
            updates = weights @ values  # (B, S, N) @ (B, N, D) -> (B, S, D)
            slots = slots.expand_as(updates)  # (S, D) -> (B, S, D) in the first round
            if needed is not None and round_ == self.num_iterations - 1:
                slots = self._update_needed(updates, slots, hidden_gates, needed)
            else:
                slots = self._update(updates, slots, hidden_gates)
            if frozen is not None:
                slots = torch.where(frozen[:, None], initial, slots)
        return SlotAttentionOutput(slots=slots, assignment=assignment)

    def _keys_values(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, N, D) keys and values of the real tokens, zeros on padding (which every round masks out)."""
        if mask is None:
            normed = self.input_norm(tokens)
            return self.k_proj(normed), self.v_proj(normed)
        layout = TokenLayout.of(mask)
        normed = self.input_norm(layout.pack(tokens))  # (T, D), the real tokens only
        return layout.unpack(self.k_proj(normed)), layout.unpack(self.v_proj(normed))

    def hidden_gates(self, slots: Tensor) -> Tensor:
        """(..., D) -> (..., 3D): the GRU's recurrent gates ``W_hh h + b_hh``."""
        return F.linear(slots, self.gru.weight_hh, self.gru.bias_hh)

    def _update(self, updates: Tensor, slots: Tensor, hidden_gates: Tensor | None) -> Tensor:
        """GRU then residual MLP on (..., D) rows: the reads ``updates``, the states ``slots`` and
        their recurrent gates (..., 3D) when already computed."""
        gates = self.hidden_gates(slots) if hidden_gates is None else hidden_gates
        updated = gru_cell(updates, slots, gates, self.gru)
        return updated + self.mlp(self.mlp_norm(updated))

    def _update_needed(self, updates: Tensor, slots: Tensor, hidden_gates: Tensor | None, needed: Tensor) -> Tensor:
        """``_update`` of the (B, S) ``needed`` rows only; the others are zeros."""
        rows = needed.flatten().nonzero().squeeze(1)  # (R,) positions b * S + s
        picked = [None if x is None else x.flatten(0, 1).index_select(0, rows) for x in (updates, slots, hidden_gates)]
        out = self._update(*picked)  # (R, D) from (R, D), (R, D) and (R, 3D) or None
        return slots.new_zeros(slots.flatten(0, 1).shape).index_copy(0, rows, out).view_as(slots)


def gru_cell(inputs: Tensor, hidden: Tensor, hidden_gates: Tensor, gru: nn.GRUCell) -> Tensor:
    """``gru(inputs, hidden)`` with the recurrent gates ``W_hh hidden + b_hh`` given, so that they
    can be computed once for slots shared by every item. The same operations, in the same order,
    as PyTorch's CPU GRU cell (Cho et al. 2014, arXiv:1406.1078).

    Args:
        inputs: (..., D_in); hidden: (..., D); hidden_gates: (..., 3D), broadcastable to them.

    Returns:
        (..., D) the new hidden state.
    """
    reset_in, update_in, new_in = F.linear(inputs, gru.weight_ih, gru.bias_ih).chunk(3, dim=-1)  # (..., D) each
    reset_hidden, update_hidden, new_hidden = hidden_gates.chunk(3, dim=-1)
    reset = torch.sigmoid(reset_hidden + reset_in)
    update = torch.sigmoid(update_hidden + update_in)
    new = torch.tanh(new_in + new_hidden * reset)
    return (hidden - new) * update + new
