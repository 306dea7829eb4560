"""The CNN image encoder's two token layouts: one token per cell (raster order) or per column."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from polymodal.encoders.cnn import CNNEncoder


def test_column_tokens_read_left_to_right_from_the_same_feature_map():
    torch.manual_seed(0)
    cells = CNNEncoder(1, (32, 96), dim=16, num_stages=3)
    torch.manual_seed(0)
    columns = CNNEncoder(1, (32, 96), dim=16, num_stages=3, tokens="columns")
    images = torch.randn(2, 1, 32, 96)
    out = columns.forward_intermediates(images)
    assert out.output.tokens.shape == (2, 12, 16)  # 96 / 8 columns
    assert cells(images).tokens.shape == (2, 4 * 12, 16)
    # The same convolutions: the column token is a linear map of that column's 4 cells.
    feature_map = rearrange(out.hidden[-1], "b (h w) d -> b w (d h)", h=4)
    expected = columns.columns(feature_map) + columns.pos
    torch.testing.assert_close(out.output.tokens, expected)
    torch.testing.assert_close(columns(images).tokens, out.output.tokens)


def test_an_unknown_token_layout_names_the_choices():
    with pytest.raises(ValueError, match="'cells' or 'columns'"):
        CNNEncoder(1, (32, 96), tokens="rows")
