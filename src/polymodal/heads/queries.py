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
        hidden: (B, Ns + N, D) the pass's states, source first (``HeadOutput.hidden``).
        condition: (B, N, dim_out) the connector's output, the generator's condition tokens.
    """

    hidden: Tensor
    condition: Tensor


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
        where: the config key of the head, for errors.
    """

    def __init__(
        self, dim: int, dim_out: int, target: Modality, *, num_queries: int, connector: dict, train_backbone: bool, where: str
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.target, self.train_backbone = target, train_backbone
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

    def forward(self, trunk, source: Tensor, source_mask: Tensor) -> QueryCondition:
        """The condition of every item: source (B, Ns, D) and its mask (B, Ns)."""
        hidden = self._pass(trunk, source, source_mask)
        condition = self.connector(hidden[:, source.shape[1] :])  # (B, N, D) -> (B, N, dim_out)
        if not self.train_backbone:  # hand back ordinary source states (see the module's docstring)
            hidden = torch.cat([trunk.source_states(source, source_mask), hidden[:, source.shape[1] :]], dim=1)
        return QueryCondition(hidden, condition)

    def empty(self, trunk, like: Tensor) -> Tensor:
        """The empty condition (1, N, dim_out): the queries over no source token; ``like`` gives
        the dtype and device."""
        none = like.new_zeros(1, 0, like.shape[-1])  # (1, 0, D)
        return self.connector(self._pass(trunk, none, none.new_zeros(1, 0, dtype=torch.bool)))
