"""Text -> image as VQ codes drawn one after another (``vq_codes``), each position also told which
caption token its column draws: the caption tokens' widths in pixel columns come from monotonic
alignment search over the item's own image, so no dataset alignment is needed.

An image of writing reads left to right, as speech does, so its pixel columns are the frames MAS
aligns to the source tokens, as ``mas_mel`` aligns log-mel frames (``state_alignment.py``): each
token's state gives ``states_per_token`` mean columns, MAS finds the monotonic path of the image's
columns through them, and a token's width is its count of columns. The first and last tokens
([bos], [eos]) share one mean, each item's own edge column (the mean of its first and last pixel
columns), and the blank margins are theirs alone: the leading and trailing columns within
``margin_tolerance`` of that edge column cost any other token's state a prohibitive penalty in
MAS. Without it, each token's first state learned the blank column, took the margin before its
digit, and the column tokens pointed at the wrong digit (the first run's widths, BENCHMARKS.md). A width head learns log(1 + columns), as
``aligned_vq``'s; the length regulator then gives every code column the token its centre falls in
and where in that token (``length_regulator.align_frames``), and that token's state plus the
phase is added to the input of each position of the column. Generation predicts the widths first.

Why: ``vq_codes`` alone must find out by itself which token each column draws. Given the real
codes of a three-digit number's first eight of twelve columns, it still draws the third digit
right only 48% of the time (BENCHMARKS.md). Predicting every code at once from the aligned tokens
(``aligned_vq``'s way, here on each item's own handwriting) drew averaged, unreadable digits
(1.3% judged): the codes of one image need each other, so they stay autoregressive. The
assumption is the data's: images whose content follows the source left to right (handwriting,
printed text, a row of things named in order). For other images use ``vq_codes``.

References: Kim et al. 2020, Glow-TTS, arXiv:2005.11129 (MAS); Ren et al. 2019, FastSpeech,
arXiv:1905.09263 (durations and the length regulator).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.errors import ConfigError
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.heads.image_codes import INIT_STD, ImageCodeHead
from polymodal.heads.length_regulator import PHASE_BUCKETS, align_frames, duration_loss, gather_tokens, predicted_durations
from polymodal.heads.state_alignment import TokenStateAlignment


@HEADS.register("mas_vq")
class MASCodeHead(TokenStateAlignment, ImageCodeHead):
    """``vq_codes`` with each position's caption token by MAS over pixel columns.

    Args:
        wiring: as ``vq_codes``.
        states_per_token: mean columns each token has, in order (a digit or letter is several
            strokes, which one mean column fits no better than its neighbours' columns).
        alignment_prior: weight of the diagonal prior added before MAS (0: none).
        margin_tolerance: an image's leading and trailing columns within this mean squared
            difference of its edge column are margin, which only [bos] and [eos] may take.
        order, group, temperature, top_k, guidance, condition_dropout: as ``vq_codes`` (one grid
            is drawn per item: no ``candidates``).
    """

    def __init__(
        self, wiring: HeadWiring, *, states_per_token: int = 3, alignment_prior: float = 1.0, margin_tolerance: float = 0.01, order: str = "columns",
        group: tuple[int, int] = (1, 1), temperature: float = 1.0, top_k: int = 0, guidance: float = 1.0, condition_dropout: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(
            wiring, order=order, group=group, temperature=temperature, top_k=top_k, guidance=guidance, condition_dropout=condition_dropout
        )
        if states_per_token < 1 or alignment_prior < 0 or margin_tolerance < 0:
            raise ConfigError("model.heads.image needs states_per_token >= 1, alignment_prior >= 0 and margin_tolerance >= 0")
        self.states_per_token, self.alignment_prior, self.margin_tolerance = states_per_token, alignment_prior, margin_tolerance
        height, width = wiring.shapes.image_size
        self.column_pixels = width / self.code_grid[1]
        self.prior_head = nn.Linear(wiring.dim, states_per_token * wiring.shapes.image_channels * height)
        self.width_head = nn.Linear(wiring.dim, 1)  # log(1 + pixel columns) per source token
        self.column_phase_embed = nn.Embedding(PHASE_BUCKETS, wiring.dim)
        for layer in (self.prior_head, self.width_head, self.column_phase_embed):
            nn.init.normal_(layer.weight, std=INIT_STD)
        for layer in (self.prior_head, self.width_head):
            nn.init.zeros_(layer.bias)
        # The code column each backbone position draws (the column of its block's first code).
        grid = torch.arange(self.code_grid[1]).expand(1, *self.code_grid)
        self.register_buffer("position_column", self.to_sequence(grid)[0, :: self.group_size].clone(), persistent=False)

    def aligned_inputs(self, source: Tensor, widths: Tensor) -> Tensor:
        """(B, num_positions, D): for each position, the source token (B, Ns, D) its code column's
        centre falls in under ``widths`` (B, Ns) in pixel columns, plus where in that token."""
        index, phase, _ = align_frames(widths, self.column_pixels, self.code_grid[1])  # (B, w)
        columns = gather_tokens(source, index) + self.column_phase_embed(phase)  # (B, w, D)
        return columns[:, self.position_column]

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        """``vq_codes``'s loss with each position's aligned token, the width head's and the prior's."""
        columns = rearrange(target.values, "b c h w -> b w (c h)").float()  # (B, W, C H): the frames
        every = torch.ones(columns.shape[:2], dtype=torch.bool, device=columns.device)
        read = trunk.source_states(source, source_mask)
        edge = (columns[:, :1] + columns[:, -1:]) / 2  # (B, 1, C H)
        widths, prior = self.aligned_durations(read, source_mask, columns, every, edge, margin_columns(columns, edge, self.margin_tolerance))
        codes = self.to_sequence(self.tokenizer.encode(target.values))
        out = self.code_loss(trunk, source, source_mask, codes, self.aligned_inputs(source, widths))
        losses = {**out.losses, "width": duration_loss(self.width_head, read, source_mask, widths), "prior": prior}
        return HeadOutput(out.hidden, losses, out.metrics, counts={"width": source_mask.sum(), "prior": every.sum()})

    def draw_sequences(self, trunk, source: Tensor, source_mask: Tensor, **sampling) -> Tensor:
        """``vq_codes``'s drawing with the aligned tokens of the predicted widths."""
        widths = predicted_durations(self.width_head, trunk, source, source_mask)
        return super().draw_sequences(trunk, source, source_mask, **sampling, extra=self.aligned_inputs(source, widths))


def margin_columns(columns: Tensor, edge: Tensor, tolerance: float) -> Tensor:
    """(B, W) True on each image's leading and trailing columns (B, W, M) that differ from its edge
    column (B, 1, M) by at most ``tolerance`` (mean squared, per value): the blank margins."""
    blank = (columns - edge).square().mean(-1) <= tolerance  # (B, W)
    leading = blank.cumprod(1).bool()
    trailing = blank.flip(1).cumprod(1).flip(1).bool()
    return leading | trailing
