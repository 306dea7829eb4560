"""Learnable queries (MetaQuery): N learned tokens appended after the source in the prefix-LM
layout read it through the shared backbone; a connector (``polymodal.connectors``) turns their
final states into a generator's condition tokens.

The queries see the whole source and the source never sees them (``trunk.run``), so the source
positions of the pass equal a pass over the source alone. The empty condition, for
classifier-free guidance, is the same path with no source token at all: the queries read only each
other (MetaQuery runs the empty prompt through the same MLLM, queries and connector).

With ``train_backbone`` False the generator's loss leaves the backbone and the source encoders as
they are, as MetaQuery's frozen MLLM: the queries' pass runs on detached copies of the backbone's
weights and of the source tokens, so gradients still flow through the backbone into the queries
(and the connector), never into its weights. Other tasks still train the backbone. The source
states handed back for other tasks (the contrastive task pools them) then come from a separate,
ordinary pass over the source alone, so their gradients are unchanged.

With ``read_source`` the condition is the connector over the backbone's final states of the
source tokens (the caption's own token states) followed by the queries' states, with a mask that
hides the source's padding. MetaQuery passes only the queries; the reason here is measured: with a
backbone trained from scratch for 1,000 steps on one CPU thread the queries do not carry the
caption (the ``metaquery`` preset's ``flow_matching`` head read 2.7% of its images as the asked
number while the same U-Net under a perfect per-slot condition reads 44.1%; BENCHMARKS.md, "A
U-Net velocity network for the flow image heads"), whereas the caption's token states carry it
position by position. The empty condition then has no source token: its source slots are zeros marked as padding, so a
velocity network that never reads padding sees exactly the queries over no source, and an item
dropped in training (condition dropout) is exactly the empty condition.

With ``condition_grad`` False the connector reads detached states: the generator's loss trains the
connector and the generator and stops there, so the queries and the backbone learn only from what
other losses ask of the queries' states (``flow_matching_codes`` in ``heads/flow_image.py``).

Reference: Pan et al. 2025, Transfer between Modalities with MetaQueries, arXiv:2504.06256.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from polymodal.connectors import CONNECTORS
from polymodal.modality import Modality
from polymodal.models.sequence import prefix_lm_pass

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale, as the backbone's tokens


@dataclasses.dataclass(frozen=True)
class QueryCondition:
    """What the queries make of a source.

    Attributes:
        hidden: (B, Ns + N, D) the pass's states, source first (``HeadOutput.hidden``); for the
            empty condition (1, N, D), the queries over no source.
        condition: (B, Nc, dim_out) the connector's output, the generator's condition tokens: the N
            queries' (Nc = N), or with ``read_source`` the Ns source tokens' then the queries'
            (Nc = Ns + N), zero on the source's padding.
        mask: (B, Nc) True on real condition tokens, with ``read_source``; None (every token real)
            without.
    """

    hidden: Tensor
    condition: Tensor
    mask: Tensor | None = None


class _DetachedWeights:
    """Calls a module with detached copies of its parameters: gradients reach its inputs only."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.skips_padding = getattr(module, "skips_padding", False)  # what prefix_lm_pass asks a backbone

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        weights = {name: p.detach() for name, p in self.module.named_parameters()}
        return functional_call(self.module, weights, args, kwargs)


class LearnableQueries(nn.Module):
    """``num_queries`` learned tokens of one target modality and their connector.

    Args:
        dim: the backbone width D.
        dim_out: the condition's width.
        target: the modality the queries stand for (its type embedding is added to them).
        num_queries: N (MetaQuery: 64 by default, quality levels off there).
        connector: the connector's spec (``{"name": "mlp" | "transformer", **settings}``).
        train_backbone: whether the generator's loss trains the backbone and the source encoders.
        read_source: whether the condition also carries the source tokens' final states, before
            the queries' (see the module's docstring).
        condition_grad: whether the generator's loss reaches past the connector (see the
            module's docstring).
        where: the config key of the head, for errors.
    """

    def __init__(
        self, dim: int, dim_out: int, target: Modality, *, num_queries: int, connector: dict, train_backbone: bool,
        read_source: bool = False, condition_grad: bool = True, where: str,
    ) -> None:  # fmt: skip
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.target, self.train_backbone, self.read_source = target, train_backbone, read_source
        self.condition_grad = condition_grad
        self.queries = nn.Parameter(torch.zeros(num_queries, dim))
        self.connector = CONNECTORS.build(connector, dim, dim_out, where=f"{where}.connector")
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.queries, std=INIT_STD)
        self.connector.init_weights()

    def _pass(self, trunk, source: Tensor, source_mask: Tensor) -> Tensor:
        """(B, Ns + N, D): the backbone over ``[source][queries]``."""
        queries = self.queries.expand(source.shape[0], -1, -1)  # (N, D) -> (B, N, D)
        type_row = trunk.type_embedding(self.target, queries)  # (D,), shared with the trunk's inputs
        every = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        if self.train_backbone:
            return trunk.run(source, source_mask, queries + type_row, every)
        frozen = _DetachedWeights(trunk.backbone)
        routing = trunk.routing.options(len(source), source.shape[1], queries.shape[1], device=source.device)  # MoE: per-token modalities
        return prefix_lm_pass(frozen, source.detach(), source_mask, queries + type_row.detach(), every, routing=routing)

    def _condition(self, states: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The connector over the pass's states (B, Ns + N, D), the source's mask (B, Ns): the
        condition (B, Nc, dim_out) and its mask (B, Nc) or None (``QueryCondition``)."""
        num_source = source_mask.shape[1]
        if not self.condition_grad:
            states = states.detach()
        if not self.read_source:
            return self.connector(states[:, num_source:]), None  # (B, N, D) -> (B, N, dim_out)
        every = source_mask.new_ones(len(states), states.shape[1] - num_source)  # (B, N) the queries are real
        mask = torch.cat([source_mask, every], dim=1)  # (B, Ns + N)
        condition = self.connector(states, mask)  # (B, Ns + N, D) -> (B, Ns + N, dim_out)
        return condition.masked_fill(~mask[:, :, None], 0.0), mask  # padding exactly zero, as the empty condition's

    def forward(self, trunk, source: Tensor, source_mask: Tensor) -> QueryCondition:
        """The condition of every item: source (B, Ns, D) and its mask (B, Ns)."""
        hidden = self._pass(trunk, source, source_mask)
        condition, mask = self._condition(hidden, source_mask)
        if not self.train_backbone:  # hand back ordinary source states (see the module's docstring)
            hidden = torch.cat([trunk.source_states(source, source_mask), hidden[:, source.shape[1] :]], dim=1)
        return QueryCondition(hidden, condition, mask)

    def empty(self, trunk, like: Tensor, *, num_source: int = 0) -> QueryCondition:
        """The empty condition, one item: the queries over no source token; ``like`` gives the
        dtype and device. With ``read_source`` it has ``num_source`` source slots (to line up with
        the items' conditions), zeros marked as padding, then the queries' N tokens."""
        none = like.new_zeros(1, 0, like.shape[-1])  # (1, 0, D)
        hidden = self._pass(trunk, none, none.new_zeros(1, 0, dtype=torch.bool))  # (1, N, D)
        condition, mask = self._condition(hidden, none.new_zeros(1, 0, dtype=torch.bool))
        if mask is None or num_source == 0:
            return QueryCondition(hidden, condition, mask)
        slots = condition.new_zeros(1, num_source, condition.shape[-1])  # (1, Ns, dim_out)
        padding = mask.new_zeros(1, num_source)  # (1, Ns) every slot padding
        return QueryCondition(hidden, torch.cat([slots, condition], dim=1), torch.cat([padding, mask], dim=1))
