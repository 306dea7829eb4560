"""Text (or any source) -> image as VQ codes, predicted one after another from the item's own image.

The target is the code grid of the item's own image under the run's frozen VQ-VAE (stage 1), read
in ``order``: ``columns`` (left to right, each column top to bottom) or ``raster`` (row by row).
The codes follow the source in the prefix-LM layout, each input token the previous code (a start
token first) plus an embedding of the position it predicts; cross-entropy trains every position at
once (teacher forcing) and generation draws them one by one through the backbone's KV cache. It
needs no alignment and no reference: it learns from any image-caption pairs. Each caption has many
images, so the codes are drawn (``temperature``, ``top_k``), not taken greedily: sampling gives
the variety real handwriting has.

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
from torch import Tensor, nn

from polymodal.decoders.sampling import sample_next
from polymodal.errors import ConfigError
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.heads.text import cached_target_step, token_loss
from polymodal.modality import Modality

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale
ORDERS = ("columns", "raster")


@HEADS.register("vq_codes")
class ImageCodeHead(nn.Module):
    """The item's own image as VQ codes, one after another after the source.

    Args:
        wiring: needs ``image_tokenizer``: a trained VQ-VAE (``model.image_tokenizer: {name: vqvae}``),
            frozen and kept in eval mode here.
        order: ``columns`` or ``raster``: the order the codes are predicted in.
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
        self, wiring: HeadWiring, *, order: str = "columns", temperature: float = 1.0, top_k: int = 0,
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
        self.num_codes = tokenizer.num_codes
        self.code_embed = nn.Embedding(self.num_codes + 1, wiring.dim)  # the last id is the start token
        self.position_embed = nn.Embedding(self.code_grid[0] * self.code_grid[1], wiring.dim)
        self.code_head = nn.Linear(wiring.dim, self.num_codes, bias=False)
        for table in (self.code_embed, self.position_embed, self.code_head):
            nn.init.normal_(table.weight, std=INIT_STD)

    def train(self, mode: bool = True) -> "ImageCodeHead":
        """As ``nn.Module.train``, but the frozen tokenizer stays in eval mode (its EMA codebook must not move)."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    @property
    def num_positions(self) -> int:
        return self.code_grid[0] * self.code_grid[1]

    def to_sequence(self, codes: Tensor) -> Tensor:
        """(B, h, w) code grid -> (B, h * w) in ``order``."""
        return (codes.transpose(1, 2) if self.order == "columns" else codes).flatten(1)

    def to_grid(self, sequence: Tensor) -> Tensor:
        """(B, h * w) codes in ``order`` -> (B, h, w)."""
        height, width = self.code_grid
        if self.order == "columns":
            return sequence.reshape(-1, width, height).transpose(1, 2)
        return sequence.reshape(-1, height, width)

    def embed_inputs(self, trunk, previous: Tensor, start: int) -> Tensor:
        """Input tokens (B, n, D) for positions ``start ..``: the previous code (or the start token)
        and the position each predicts, with the image type embedding."""
        positions = torch.arange(start, start + previous.shape[1], device=previous.device)
        tokens = self.code_embed(previous) + self.position_embed(positions)
        return tokens + trunk.type_embedding(Modality.IMAGE, tokens)

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
        codes = self.to_sequence(self.tokenizer.encode(target.values))  # (B, h * w)
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(len(codes), device=codes.device) < self.condition_dropout
            source_mask = torch.where(dropped[:, None], self.empty_source(source_mask), source_mask)
        hidden = self.teacher_forced(trunk, source, source_mask, codes)
        loss, metrics = token_loss(self.code_head(hidden[:, source.shape[1] :]), codes)
        return HeadOutput(hidden, {"": loss}, metrics)

    def teacher_forced(self, trunk, source: Tensor, source_mask: Tensor, codes: Tensor) -> Tensor:
        """The backbone over the source and every code's input at once: (B, Ns + h * w, D); the
        state at source length + i predicts ``codes[:, i]`` (B, h * w) in ``order``."""
        start = torch.full_like(codes[:, :1], self.num_codes)
        inputs = self.embed_inputs(trunk, torch.cat([start, codes[:, :-1]], dim=1), 0)
        every = torch.ones(codes.shape, dtype=torch.bool, device=codes.device)
        return trunk.run(source, source_mask, inputs, every)

    @torch.no_grad()
    def source_specificity(self, trunk, source: Tensor, source_mask: Tensor, codes: Tensor) -> Tensor:
        """log p(codes | source) - log p(codes | empty source) per item (B,), for codes (B, h * w) in ``order``."""
        both = self.teacher_forced(trunk, *self.with_empty_source(source, source_mask), torch.cat([codes, codes]))
        log_probs = self.code_head(both[:, source.shape[1] :]).float().log_softmax(-1)  # (2B, h * w, K)
        per_item = log_probs.gather(-1, torch.cat([codes, codes])[..., None]).squeeze(-1).sum(1)  # (2B,)
        conditional, empty = per_item.chunk(2)
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
        k, batch_size = self.candidates, len(source)
        source, source_mask = source.repeat(k, 1, 1), source_mask.repeat(k, 1)  # candidate c of item b at c * B + b
        drawn = self.draw_sequences(trunk, source, source_mask, **sampling)  # (K B, h * w)
        scores = self.source_specificity(trunk, source, source_mask, drawn).view(k, batch_size)
        best = scores.argmax(0) * batch_size + torch.arange(batch_size, device=drawn.device)  # (B,)
        return self.to_grid(drawn[best])

    def draw_sequences(
        self, trunk, source: Tensor, source_mask: Tensor, *, temperature: float, top_k: int, top_p: float, guidance: float,
        generator: torch.Generator | None,
    ) -> Tensor:  # fmt: skip
        """One code sequence (B, h * w) in ``order`` per item, drawn code by code through the KV cache."""
        batch_size = len(source)
        if guidance != 1.0:  # the conditional and the empty source side by side
            source, source_mask = self.with_empty_source(source, source_mask)
        cache = trunk.backbone.new_cache(len(source), source.shape[1] + self.num_positions, device=source.device, dtype=source.dtype)
        previous = torch.full((len(source), 1), self.num_codes, dtype=torch.long, device=source.device)
        every = torch.ones_like(previous, dtype=torch.bool)
        hidden = trunk.run(source, source_mask, self.embed_inputs(trunk, previous, 0), every, cache=cache)[:, -1]
        codes = []
        for step in range(self.num_positions):
            logits = self.code_head(hidden).float()  # (B or 2B, num_codes)
            if guidance != 1.0:
                conditional, empty = logits.chunk(2)
                logits = empty + guidance * (conditional - empty)
            code = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            codes.append(code)
            if step + 1 == self.num_positions:
                break
            token = self.embed_inputs(trunk, code.repeat(len(source) // batch_size)[:, None], step + 1)
            hidden = cached_target_step(trunk, token, source_mask, step + 1, cache)[:, -1]
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
