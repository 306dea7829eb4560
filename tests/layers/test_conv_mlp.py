"""The grid-convolution MLP against a dense reference that writes the depthwise convolution as a
sum over each token's neighbours, against the plain GELU MLP when the convolution is zero, and its
locality: a token reaches only the tokens within the kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.layers.conv_mlp import GridConvMLP
from polymodal.layers.mlp import GeluMLP

ROWS, COLS, DIM, HIDDEN = 3, 5, 8, 6


def _made(kernel_size: int = 3) -> GridConvMLP:
    torch.manual_seed(0)
    mlp = GridConvMLP(DIM, HIDDEN, (ROWS, COLS), kernel_size=kernel_size)
    mlp.init_weights()
    nn.init.normal_(mlp.conv.bias)  # nonzero, so that the reference must add it
    return mlp


def _dense(mlp: GridConvMLP, x: torch.Tensor) -> torch.Tensor:
    """The same block written out: hidden of token (r, c) plus sum over the kernel's offsets."""
    hidden = mlp.fc1(x)  # (B, R C, H)
    weight = mlp.conv.weight[:, 0]  # (H, k, k)
    half = weight.shape[-1] // 2
    mixed = hidden.clone()
    for r in range(ROWS):
        for c in range(COLS):
            total = mlp.conv.bias.expand(len(x), -1).clone()
            for dr in range(-half, half + 1):
                for dc in range(-half, half + 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < ROWS and 0 <= cc < COLS:  # zero padding outside the grid
                        total = total + weight[:, dr + half, dc + half] * hidden[:, rr * COLS + cc]
            mixed[:, r * COLS + c] = hidden[:, r * COLS + c] + total
    return mlp.fc2(F.gelu(mixed))


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_equals_the_neighbour_sum_written_out(kernel_size):
    mlp = _made(kernel_size)
    x = torch.randn(2, ROWS * COLS, DIM)
    torch.testing.assert_close(mlp(x), _dense(mlp, x), rtol=1e-5, atol=1e-6)


def test_a_zero_convolution_is_the_plain_mlp():
    mlp = _made()
    nn.init.zeros_(mlp.conv.weight)
    nn.init.zeros_(mlp.conv.bias)
    plain = GeluMLP(DIM, HIDDEN)
    plain.load_state_dict({k: v for k, v in mlp.state_dict().items() if k.startswith(("fc1", "fc2"))})
    x = torch.randn(2, ROWS * COLS, DIM)
    torch.testing.assert_close(mlp(x), plain(x))


def test_a_token_reaches_only_its_neighbours():
    mlp = _made()
    x = torch.randn(1, ROWS * COLS, DIM)
    moved = x.clone()
    moved[0, 1 * COLS + 2] += 1.0  # token (1, 2)
    changed = (mlp(moved) - mlp(x)).abs().amax(-1)[0].reshape(ROWS, COLS) > 0
    expected = torch.zeros(ROWS, COLS, dtype=torch.bool)
    expected[0:3, 1:4] = True  # the 3 x 3 block around (1, 2)
    assert torch.equal(changed, expected)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        GridConvMLP(DIM, HIDDEN, (ROWS, COLS), kernel_size=2)
    with pytest.raises(ValueError, match="14 tokens do not fill the 3 x 5 grid"):
        _made()(torch.randn(1, 14, DIM))
