"""Text -> image as VQ codes through a length regulator (FastSpeech-style, non-autoregressive),
learned from the dataset's aligned reference images.

The source is the text as a writer writes it; the target is its reference image, aligned token by
token: each source token covers some pixel columns (``AlignedTargets.durations``). A width head on
the source states learns log(1 + columns); the length regulator gives every VQ code a target token,
a copy of the source token its column falls in, plus an embedding of where in that token it lies
and of its row; one backbone pass predicts every code of the frozen VQ-VAE (cross-entropy).
Training uses the true widths, generation the predicted ones.

Groups (``group: [gh, gw]``, default one code): each target token predicts a gh x gw block of codes
at once, one linear read-out per slot. A VQ-VAE with one downsample fewer (8 x 24 codes instead of
4 x 12) keeps far more of each digit (the judge reads 87% of its reconstructions of real test
images against 72%: BENCHMARKS.md), and with ``group: [2, 2]`` costs the backbone no more target
tokens. The target is one reference image per text, so the block's codes need no order among them:
they are read in parallel, not drawn one after another as ``vq_codes``' blocks are.

References: Ren et al. 2019, FastSpeech, arXiv:1905.09263 (durations and the length regulator);
images as VQ codes, Ramesh et al. 2021, DALL-E, arXiv:2102.12092 (here predicted in parallel).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.data.batch import AlignedTargets
from polymodal.decoders.sampling import sample_next
from polymodal.heads import HEADS, HeadOutput, HeadWiring
from polymodal.heads.length_regulator import PHASE_BUCKETS, align_frames, duration_loss, gather_tokens, predicted_durations
from polymodal.heads.image_codes import check_group
from polymodal.heads.text import token_loss
from polymodal.modality import Modality

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale
_TO_BLOCKS = "b (ph gh) (pw gw) -> b (ph pw) (gh gw)"  # raster order of blocks, each block raster
_TO_GRID = " -> ".join(_TO_BLOCKS.split(" -> ")[::-1])


@HEADS.register("aligned_vq")
class AlignedCodeHead(nn.Module):
    """VQ codes of the run's frozen image tokenizer, one target token per code.

    Args:
        wiring: needs ``image_tokenizer`` (a trained VQ-VAE: ``encode``, ``decode``, ``token_grid``,
            ``num_codes``), frozen and kept in eval mode here, and the image size.
        group: ``[gh, gw]``, the block of codes each target token predicts ([1, 1]: one code).
    """

    target = Modality.IMAGE
    reads_references = True
    needs_image_tokenizer = True

    def __init__(self, wiring: HeadWiring, *, group: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        tokenizer = wiring.image_tokenizer
        if tokenizer is None or not hasattr(tokenizer, "num_codes"):
            raise ValueError("the aligned_vq head needs a trained VQ image tokenizer (model.image_tokenizer: vqvae)")
        tokenizer.requires_grad_(False)
        self.tokenizer = tokenizer.eval()
        height, width = wiring.shapes.image_size
        self.code_grid = tokenizer.token_grid(height, width)  # (h, w)
        self.group = check_group(group, self.code_grid)
        self.group_size = self.group[0] * self.group[1]
        self.block_grid = (self.code_grid[0] // self.group[0], self.code_grid[1] // self.group[1])  # target tokens
        self.column_pixels = width / self.block_grid[1]
        self.num_codes = tokenizer.num_codes
        self.column_phase_embed = nn.Embedding(PHASE_BUCKETS, wiring.dim)
        self.row_embed = nn.Embedding(self.block_grid[0], wiring.dim)
        self.width_head = nn.Linear(wiring.dim, 1)  # log(1 + pixel columns) per source token
        self.code_head = nn.Linear(wiring.dim, self.group_size * self.num_codes, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        for table in (self.column_phase_embed, self.row_embed, self.code_head, self.width_head):
            nn.init.normal_(table.weight, std=INIT_STD)
        nn.init.zeros_(self.width_head.bias)

    def train(self, mode: bool = True) -> "AlignedCodeHead":
        """As ``nn.Module.train``, but the frozen tokenizer stays in eval mode (its EMA codebook must not move)."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    def code_tokens(self, trunk, source: Tensor, widths: Tensor) -> Tensor:
        """One target token per block of VQ codes (B, bh * bw, D), raster order, from the source
        tokens' ``widths`` (B, Ns) in pixel columns: the source token its column reads, where in it, its row."""
        height, width = self.block_grid
        index, phase, _ = align_frames(widths, self.column_pixels, width)  # (B, w)
        columns = gather_tokens(source, index) + self.column_phase_embed(phase)  # (B, w, D)
        tokens = (columns[:, None, :, :] + self.row_embed.weight[None, :, None, :]).flatten(1, 2)  # (B, h * w, D)
        return tokens + trunk.type_embedding(Modality.IMAGE, tokens)

    def to_blocks(self, codes: Tensor) -> Tensor:
        """(B, h, w) codes -> (B, bh * bw, gh * gw): each target token's block, blocks in raster order."""
        return rearrange(codes, _TO_BLOCKS, gh=self.group[0], gw=self.group[1])

    def to_grid(self, blocks: Tensor) -> Tensor:
        """The inverse of ``to_blocks``: (B, bh * bw, gh * gw) -> (B, h, w)."""
        return rearrange(blocks, _TO_GRID, ph=self.block_grid[0], gh=self.group[0], gw=self.group[1])

    def code_logits(self, states: Tensor) -> Tensor:
        """(B, bh * bw, D) target-token states -> (B, h * w, K) logits, block by block as ``to_blocks``."""
        return self.code_head(states).unflatten(-1, (-1, self.num_codes)).flatten(1, 2)

    def _code_states(self, trunk, source: Tensor, source_mask: Tensor, widths: Tensor) -> Tensor:
        tokens = self.code_tokens(trunk, source, widths)
        every = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return trunk.run(source, source_mask, tokens, every)

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: AlignedTargets) -> HeadOutput:
        """Every VQ code at once, through the length regulator with the true widths; and the widths."""
        codes = self.to_blocks(self.tokenizer.encode(target.values)).flatten(1)  # (B, h * w), block by block
        hidden = self._code_states(trunk, source, source_mask, target.durations)
        loss, metrics = token_loss(self.code_logits(hidden[:, source.shape[1] :]), codes)
        width = duration_loss(self.width_head, hidden[:, : source.shape[1]], source_mask, target.durations)
        return HeadOutput(hidden, {"": loss, "width": width}, metrics, counts={"width": source_mask.sum()})

    @torch.no_grad()
    def generate_codes(
        self,
        trunk,
        source: Tensor,
        source_mask: Tensor,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """VQ codes (B, h, w): widths first, then one pass for every code; each code the most likely
        one (temperature 0) or drawn as ``sample_next`` draws."""
        widths = predicted_durations(self.width_head, trunk, source, source_mask)
        hidden = self._code_states(trunk, source, source_mask, widths)
        logits = self.code_logits(hidden[:, source.shape[1] :]).float()  # (B, h * w, K)
        codes = sample_next(logits.flatten(0, 1), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return self.to_grid(codes.reshape(len(source), -1, self.group_size))

    @torch.no_grad()
    def generate(
        self, trunk, source: Tensor, source_mask: Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Images (B, C, H, W) in [-1, 1]: ``generate_codes`` (with its sampling options) decoded by the VQ-VAE."""
        codes = self.generate_codes(trunk, source, source_mask, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return self.tokenizer.decode(codes).clamp(-1.0, 1.0)
