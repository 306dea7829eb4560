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

References: Ramesh et al. 2021, DALL-E, arXiv:2102.12092 (text then image codes in one
autoregressive transformer); Esser et al. 2021, VQGAN, arXiv:2012.09841 (sampling codes with
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
    """

    target = Modality.IMAGE
    reads_references = False
    needs_image_tokenizer = True

    def __init__(
        self, wiring: HeadWiring, *, order: str = "columns", temperature: float = 1.0, top_k: int = 0,
        guidance: float = 1.0, condition_dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        tokenizer = wiring.image_tokenizer
        if tokenizer is None or not hasattr(tokenizer, "num_codes"):
            raise ConfigError("the vq_codes head needs a trained VQ image tokenizer: set model.image_tokenizer: {name: vqvae}")
        if order not in ORDERS:
            raise ConfigError(f"model.heads.image.order: {order!r} is not one of {', '.join(ORDERS)}")
        if temperature < 0 or top_k < 0 or guidance < 0 or not 0 <= condition_dropout < 1:
            raise ConfigError("model.heads.image needs temperature >= 0, top_k >= 0, guidance >= 0 and 0 <= condition_dropout < 1")
        tokenizer.requires_grad_(False)
        self.tokenizer = tokenizer.eval()
        self.order = order
        self.temperature, self.top_k, self.guidance, self.condition_dropout = temperature, top_k, guidance, condition_dropout
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

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        """Next-code cross-entropy over every code of the item's image (teacher forcing)."""
        codes = self.to_sequence(self.tokenizer.encode(target.values))  # (B, h * w)
        start = torch.full_like(codes[:, :1], self.num_codes)
        inputs = self.embed_inputs(trunk, torch.cat([start, codes[:, :-1]], dim=1), 0)
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(len(codes), device=codes.device) < self.condition_dropout
            source_mask = torch.where(dropped[:, None], self.empty_source(source_mask), source_mask)
        every = torch.ones(codes.shape, dtype=torch.bool, device=codes.device)
        hidden = trunk.run(source, source_mask, inputs, every)
        loss, metrics = token_loss(self.code_head(hidden[:, source.shape[1] :]), codes)
        return HeadOutput(hidden, {"": loss}, metrics)

    @torch.no_grad()
    def generate_codes(
        self, trunk, source: Tensor, source_mask: Tensor, *, temperature: float | None = None,
        top_k: int | None = None, top_p: float = 1.0, guidance: float | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Code grids (B, h, w), drawn one code at a time (the configured sampling unless given here)."""
        temperature = self.temperature if temperature is None else temperature
        top_k = self.top_k if top_k is None else top_k
        guidance = self.guidance if guidance is None else guidance
        batch_size = len(source)
        if guidance != 1.0:  # the conditional and the empty source side by side
            source, source_mask = torch.cat([source, source]), torch.cat([source_mask, self.empty_source(source_mask)])
        cache = trunk.backbone.new_cache(len(source), source.shape[1] + self.num_positions, device=source.device, dtype=source.dtype)
        previous = torch.full((len(source), 1), self.num_codes, dtype=torch.long, device=source.device)
        every = torch.ones_like(previous, dtype=torch.bool)
        hidden = trunk.run(source, source_mask, self.embed_inputs(trunk, previous, 0), every, cache=cache)[:, -1]
        codes = []
        for step in range(self.num_positions):
            logits = self.code_head(hidden).float()  # (B or 2B, K)
            if guidance != 1.0:
                conditional, empty = logits.chunk(2)
                logits = empty + guidance * (conditional - empty)
            code = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            codes.append(code)
            if step + 1 == self.num_positions:
                break
            token = self.embed_inputs(trunk, code.repeat(len(source) // batch_size)[:, None], step + 1)
            hidden = cached_target_step(trunk, token, source_mask, step + 1, cache)[:, -1]
        return self.to_grid(torch.stack(codes, dim=1))

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
