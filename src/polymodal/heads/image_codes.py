"""Text (or any source) -> image as VQ codes, predicted one after another from the item's own image.

The target is the code grid of the item's own image under the run's frozen VQ-VAE (stage 1), read
in ``order``: ``columns`` (left to right, each column top to bottom) or ``raster`` (row by row).
The codes follow the source in the prefix-LM layout, each input token the previous code (a start
token first) plus an embedding of the position it predicts; cross-entropy trains every position at
once (teacher forcing) and generation draws them one by one through the backbone's KV cache. It
needs no alignment and no reference: it learns from any image-caption pairs. Each caption has many
images, so the codes are drawn (``temperature``, ``top_k``), not taken greedily: sampling gives
the variety real handwriting has.

Groups (``group: [gh, gw]``, default one code): each backbone position holds a gh x gw block of
codes, so a finer code grid (a VQ-VAE with fewer downsamples, which reconstructs more of each
image) costs the backbone no more positions. A position's input is the sum of the previous block's
codes, each embedded by a table of its own slot; a small residual MLP on the position's state then
predicts the block's codes one after another, each from the state plus the codes of the block drawn
before it (the depth step of the RQ-Transformer, Lee et al. 2022, arXiv:2203.01941, as an MLP).

Classifier-free guidance (``guidance`` > 1): training replaces the source by an empty one (its first
token alone) for a share ``condition_dropout`` of items; sampling mixes the logits with and
without the source, l_u + w (l_c - l_u), as text-to-image token models do.

Reranking (``candidates`` K > 1): K code grids are drawn per item and the one the model itself
finds most specific to the source is kept: the largest log p(codes | source) - log p(codes | empty),
the log-ratio that Bayes' rule turns into log p(source | codes) up to a constant (the implicit
classifier of classifier-free guidance). Both terms come from one teacher-forced pass over the K
grids with and without the source, so it needs no second model and no judge; DALL-E reranked its
samples with a separately trained CLIP instead.

References: Ramesh et al. 2021, DALL-E, arXiv:2102.12092 (text then image codes in one
autoregressive transformer, samples reranked); Esser et al. 2021, VQGAN, arXiv:2012.09841 (sampling codes with
top-k); Yu et al. 2022, Parti, arXiv:2206.10789 and Ho and Salimans 2022, arXiv:2207.12598
(classifier-free guidance on token logits).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.decoders.sampling import sample_next
from polymodal.errors import ConfigError
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.heads.text import cached_target_step, token_loss
from polymodal.modality import Modality

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale
ORDERS = ("columns", "raster")
# Code grid <-> sequence: positions in ``order``, and the codes of each position's block in the same order.
_TO_SEQUENCE = {"columns": "b (ph gh) (pw gw) -> b (pw ph gw gh)", "raster": "b (ph gh) (pw gw) -> b (ph pw gh gw)"}
_TO_GRID = {order: " -> ".join(pattern.split(" -> ")[::-1]) for order, pattern in _TO_SEQUENCE.items()}


class BlockDepth(nn.Module):
    """The codes of one position's block, one after another: slot j's state is the position's
    backbone state, plus the sum of the block's codes before slot j (each embedded by its own slot's
    table), plus slot j's embedding, through one residual MLP. ``code_head`` turns states into logits.

    Args:
        dim: the backbone width D.
        num_codes: K, the codebook size.
        group_size: codes per block, g.
    """

    def __init__(self, dim: int, num_codes: int, group_size: int) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.code_embed = nn.Embedding(group_size * num_codes, dim)  # slot s, code c -> s * K + c
        self.slot_embed = nn.Embedding(group_size, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        for table in (self.code_embed, self.slot_embed):
            nn.init.normal_(table.weight, std=INIT_STD)

    def state(self, hidden: Tensor, prefix: Tensor, slots: Tensor) -> Tensor:
        """States (..., D) for ``slots`` (broadcast) from backbone states and prefix sums (..., D)."""
        inputs = hidden + prefix + self.slot_embed(slots)
        return inputs + self.mlp(self.norm(inputs))

    def embed_code(self, codes: Tensor, slot: int | Tensor) -> Tensor:
        """(...) codes drawn in ``slot`` (broadcast) -> (..., D), the term they add to later slots' prefix."""
        return self.code_embed(codes + slot * self.num_codes)

    def forward(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced states (B, n, g, D) of every slot, from backbone states (B, n, D) and the
        blocks' codes (B, n, g): slot j reads codes 0 .. j - 1 of its block only."""
        group_size = codes.shape[-1]
        slots = torch.arange(group_size, device=codes.device)
        embedded = self.embed_code(codes, slots)  # (B, n, g, D)
        prefix = torch.cat([torch.zeros_like(embedded[:, :, :1]), embedded[:, :, :-1].cumsum(2)], dim=2)
        return self.state(hidden[:, :, None], prefix, slots)


@HEADS.register("vq_codes")
class ImageCodeHead(nn.Module):
    """The item's own image as VQ codes, one after another after the source.

    Args:
        wiring: needs ``image_tokenizer``: a trained VQ-VAE (``model.image_tokenizer: {name: vqvae}``),
            frozen and kept in eval mode here.
        order: ``columns`` or ``raster``: the order the codes are predicted in.
        group: ``[gh, gw]``, the block of codes each backbone position holds ([1, 1]: one code).
        temperature, top_k: how ``generate`` draws each code unless told otherwise (0: the likeliest).
        guidance: classifier-free guidance scale at sampling (1: none).
        condition_dropout: share of training items whose source is emptied (for guidance).
        candidates: code grids drawn per item at sampling, of which the most source-specific is
            kept (1: no reranking; more needs ``condition_dropout`` > 0, which trains the empty source).
    """

    target = Modality.IMAGE
    reads_references = False
    needs_image_tokenizer = True

    def __init__(
        self, wiring: HeadWiring, *, order: str = "columns", group: tuple[int, int] = (1, 1), temperature: float = 1.0, top_k: int = 0,
        guidance: float = 1.0, condition_dropout: float = 0.0, candidates: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        tokenizer = wiring.image_tokenizer
        if tokenizer is None or not hasattr(tokenizer, "num_codes"):
            raise ConfigError("the vq_codes head needs a trained VQ image tokenizer: set model.image_tokenizer: {name: vqvae}")
        if order not in ORDERS:
            raise ConfigError(f"model.heads.image.order: {order!r} is not one of {', '.join(ORDERS)}")
        if temperature < 0 or top_k < 0 or guidance < 0 or not 0 <= condition_dropout < 1:
            raise ConfigError("model.heads.image needs temperature >= 0, top_k >= 0, guidance >= 0 and 0 <= condition_dropout < 1")
        if candidates < 1 or (candidates > 1 and condition_dropout == 0):
            raise ConfigError(
                f"model.heads.image.candidates: {candidates} needs to be >= 1, and > 1 needs condition_dropout > 0 "
                "(reranking compares each grid with and without the source, so the empty source must be trained)"
            )
        tokenizer.requires_grad_(False)
        self.tokenizer = tokenizer.eval()
        self.order = order
        self.temperature, self.top_k, self.guidance, self.condition_dropout = temperature, top_k, guidance, condition_dropout
        self.candidates = candidates
        self.code_grid = tokenizer.token_grid(*wiring.shapes.image_size)  # (h, w)
        self.group = check_group(group, self.code_grid)
        self.group_size = self.group[0] * self.group[1]
        self.num_codes = tokenizer.num_codes
        # Slot s's code c is input id s * (K + 1) + c; id K of every slot makes the start block.
        self.code_embed = nn.Embedding(self.group_size * (self.num_codes + 1), wiring.dim)
        self.position_embed = nn.Embedding(self.num_positions, wiring.dim)
        self.code_head = nn.Linear(wiring.dim, self.num_codes, bias=False)
        for table in (self.code_embed, self.position_embed, self.code_head):
            nn.init.normal_(table.weight, std=INIT_STD)
        self.depth = BlockDepth(wiring.dim, self.num_codes, self.group_size) if self.group_size > 1 else None

    def train(self, mode: bool = True) -> "ImageCodeHead":
        """As ``nn.Module.train``, but the frozen tokenizer stays in eval mode (its EMA codebook must not move)."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    @property
    def num_positions(self) -> int:
        """Backbone positions per image: one per block of codes."""
        return self.code_grid[0] * self.code_grid[1] // self.group_size

    def to_sequence(self, codes: Tensor) -> Tensor:
        """(B, h, w) code grid -> (B, h * w) in ``order``: block by block, each block's codes together."""
        return rearrange(codes, _TO_SEQUENCE[self.order], gh=self.group[0], gw=self.group[1])

    def to_grid(self, sequence: Tensor) -> Tensor:
        """(B, h * w) codes in ``order`` -> (B, h, w)."""
        (gh, gw), height = self.group, self.code_grid[0]
        return rearrange(sequence, _TO_GRID[self.order], gh=gh, gw=gw, ph=height // gh)

    def embed_inputs(self, trunk, previous: Tensor, start: int, extra: Tensor | None = None) -> Tensor:
        """Input tokens (B, n, D) for positions ``start ..``: the previous block's codes (B, n * g),
        each slot by its own table (code K everywhere: the start block), plus the position each
        predicts, that position's row of ``extra`` (B, num_positions, D) when given (what a
        subclass adds per position), and the image type embedding."""
        blocks = previous.unflatten(1, (-1, self.group_size))  # (B, n, g)
        slots = torch.arange(self.group_size, device=previous.device) * (self.num_codes + 1)
        positions = torch.arange(start, start + blocks.shape[1], device=previous.device)
        tokens = self.code_embed(blocks + slots).sum(2) + self.position_embed(positions)
        if extra is not None:
            tokens = tokens + extra[:, start : start + blocks.shape[1]]
        return tokens + trunk.type_embedding(Modality.IMAGE, tokens)

    def start_block(self, batch_size: int, device) -> Tensor:
        """(B, g) ids of the start block, the input of the first position."""
        return torch.full((batch_size, self.group_size), self.num_codes, dtype=torch.long, device=device)

    def code_logits(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced logits (B, n * g, K) of codes (B, n * g) from the states (B, n, D) of
        their positions: a block's code reads the position's state and that block's earlier codes."""
        if self.depth is None:
            return self.code_head(hidden)
        states = self.depth(hidden, codes.unflatten(1, (-1, self.group_size)))  # (B, n, g, D)
        return self.code_head(states.flatten(1, 2))

    def empty_source(self, source_mask: Tensor) -> Tensor:
        """The mask of an empty condition: each item's first source token alone."""
        empty = torch.zeros_like(source_mask)
        empty[:, 0] = True
        return empty

    def with_empty_source(self, source: Tensor, source_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Each item twice, (2B, ...): first with its source, then with the empty one."""
        return torch.cat([source, source]), torch.cat([source_mask, self.empty_source(source_mask)])

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        """Next-code cross-entropy over every code of the item's image (teacher forcing)."""
        return self.code_loss(trunk, source, source_mask, self.to_sequence(self.tokenizer.encode(target.values)))

    def code_loss(self, trunk, source: Tensor, source_mask: Tensor, codes: Tensor, extra: Tensor | None = None) -> HeadOutput:
        """``loss`` for codes (B, h * w) in ``order``, with ``embed_inputs``'s ``extra``; an item
        whose source is emptied (``condition_dropout``) has no ``extra`` either."""
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(len(codes), device=codes.device) < self.condition_dropout
            source_mask = torch.where(dropped[:, None], self.empty_source(source_mask), source_mask)
            extra = None if extra is None else extra.masked_fill(dropped[:, None, None], 0.0)
        hidden = self.teacher_forced(trunk, source, source_mask, codes, extra)
        loss, metrics = token_loss(self.code_logits(hidden[:, source.shape[1] :], codes), codes)
        return HeadOutput(hidden, {"": loss}, metrics)

    def teacher_forced(self, trunk, source: Tensor, source_mask: Tensor, codes: Tensor, extra: Tensor | None = None) -> Tensor:
        """The backbone over the source and every position's input at once: (B, Ns + n, D); the
        state at source length + i predicts block i of ``codes`` (B, n * g) in ``order``."""
        start = self.start_block(len(codes), codes.device)
        inputs = self.embed_inputs(trunk, torch.cat([start, codes[:, : -self.group_size]], dim=1), 0, extra)
        every = torch.ones(inputs.shape[:2], dtype=torch.bool, device=codes.device)
        return trunk.run(source, source_mask, inputs, every)

    @torch.no_grad()
    def log_likelihood(self, trunk, source: Tensor, source_mask: Tensor, codes: Tensor) -> Tensor:
        """log p(codes | source) per item (B,), for codes (B, h * w) in ``order``: one teacher-forced pass."""
        hidden = self.teacher_forced(trunk, source, source_mask, codes)[:, source.shape[1] :]
        log_probs = self.code_logits(hidden, codes).float().log_softmax(-1)  # (B, h * w, K)
        return log_probs.gather(-1, codes[..., None]).squeeze(-1).sum(1)

    @torch.no_grad()
    def source_specificity(self, trunk, source: Tensor, source_mask: Tensor, codes: Tensor) -> Tensor:
        """log p(codes | source) - log p(codes | empty source) per item (B,), for codes (B, h * w) in ``order``."""
        conditional, empty = self.log_likelihood(trunk, *self.with_empty_source(source, source_mask), torch.cat([codes, codes])).chunk(2)
        return conditional - empty

    @torch.no_grad()
    def generate_codes(
        self, trunk, source: Tensor, source_mask: Tensor, *, temperature: float | None = None,
        top_k: int | None = None, top_p: float = 1.0, guidance: float | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Code grids (B, h, w), drawn one code at a time (the configured sampling unless given here);
        with ``candidates`` K > 1, the most source-specific of K grids drawn per item."""
        temperature = self.temperature if temperature is None else temperature
        top_k = self.top_k if top_k is None else top_k
        guidance = self.guidance if guidance is None else guidance
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance, generator=generator)
        if self.candidates == 1:
            return self.to_grid(self.draw_sequences(trunk, source, source_mask, **sampling))
        k = self.candidates
        source, source_mask = source.repeat(k, 1, 1), source_mask.repeat(k, 1)  # candidate c of item b at c * B + b
        drawn = self.draw_sequences(trunk, source, source_mask, **sampling)  # (K B, h * w)
        return self.to_grid(best_of(drawn, self.source_specificity(trunk, source, source_mask, drawn), k))

    def draw_sequences(
        self, trunk, source: Tensor, source_mask: Tensor, *, temperature: float, top_k: int, top_p: float, guidance: float,
        generator: torch.Generator | None, extra: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """One code sequence (B, h * w) in ``order`` per item, drawn code by code through the KV
        cache; ``extra`` as ``embed_inputs`` (zeros beside the empty source when guided)."""
        batch_size = len(source)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if guidance != 1.0:  # the conditional and the empty source side by side
            source, source_mask = self.with_empty_source(source, source_mask)
            extra = None if extra is None else torch.cat([extra, torch.zeros_like(extra)])
        cache = trunk.backbone.new_cache(len(source), source.shape[1] + self.num_positions, device=source.device, dtype=source.dtype)
        every = torch.ones(len(source), 1, dtype=torch.bool, device=source.device)
        inputs = self.embed_inputs(trunk, self.start_block(len(source), source.device), 0, extra)
        hidden = trunk.run(source, source_mask, inputs, every, cache=cache)[:, -1]
        blocks = []
        for step in range(self.num_positions):
            block = self.draw_block(hidden, guidance, sampling)  # (B, g)
            blocks.append(block)
            if step + 1 == self.num_positions:
                break
            token = self.embed_inputs(trunk, block.repeat(len(source) // batch_size, 1), step + 1, extra)
            hidden = cached_target_step(trunk, token, source_mask, step + 1, cache)[:, -1]
        return torch.cat(blocks, dim=1)

    def draw_block(self, hidden: Tensor, guidance: float, sampling: dict) -> Tensor:
        """One position's block (B, g), code after code, from its states (B or, guided, 2B, D),
        each code drawn by ``sample_next`` with ``sampling``."""
        prefix, codes = torch.zeros_like(hidden), []
        for slot in range(self.group_size):
            state = hidden if self.depth is None else self.depth.state(hidden, prefix, torch.tensor(slot, device=hidden.device))
            logits = self.code_head(state).float()  # (B or 2B, K)
            if guidance != 1.0:
                conditional, empty = logits.chunk(2)
                logits = empty + guidance * (conditional - empty)
            codes.append(sample_next(logits, **sampling))
            if self.depth is not None:
                prefix = prefix + self.depth.embed_code(codes[-1].repeat(len(hidden) // len(logits)), slot)
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def generate(
        self, trunk, source: Tensor, source_mask: Tensor, *, temperature: float | None = None, top_k: int | None = None,
        top_p: float = 1.0, guidance: float | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Images (B, C, H, W) in [-1, 1]: ``generate_codes`` decoded by the VQ-VAE."""
        codes = self.generate_codes(
            trunk, source, source_mask, temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance, generator=generator
        )
        return self.tokenizer.decode(codes).clamp(-1.0, 1.0)


def best_of(drawn: Tensor, scores: Tensor, k: int) -> Tensor:
    """Of K candidates per item, laid out as candidate c of item b at row c * B + b of ``drawn``
    (K B, ...) and ``scores`` (K B,), the best-scoring one of each item: (B, ...)."""
    batch_size = len(drawn) // k
    best = scores.view(k, batch_size).argmax(0) * batch_size + torch.arange(batch_size, device=drawn.device)  # (B,)
    return drawn[best]


def check_group(group, grid: tuple[int, int]) -> tuple[int, int]:
    """``group`` as (gh, gw), or a ConfigError naming the key unless it tiles the code grid (h, w)."""
    if len(group) != 2 or not all(isinstance(g, int) and g >= 1 for g in group) or grid[0] % group[0] or grid[1] % group[1]:
        raise ConfigError(
            f"model.heads.image.group: {list(group)} must be two positive integers [gh, gw] that divide the "
            f"VQ-VAE's code grid {list(grid)} (height, width)"
        )
    return group[0], group[1]
