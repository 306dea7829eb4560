"""The flow decoders' DiT: its fixed positions against the sin-cos tables written out, masked
condition tokens against the real ones alone, and (slow) a
small flow trained on bars at random places draws whole bars, which only patches that know where
they are and read each other can do."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

from polymodal.decoders.dit import FlowTransformer
from polymodal.decoders.flow_sampling import integrate
from polymodal.layers.positional import sinusoidal_embedding
from polymodal.losses.flow_matching import flow_matching_loss, interpolate, target_velocity


def test_a_grids_positions_are_the_2d_table_and_a_sequences_the_1d_one():
    grid = FlowTransformer(5, (2, 3), 7, dim=8, num_layers=1, num_heads=2)
    # dim 8: two frequencies per axis, 1 and 10000^(-1/2); row features first, then column features.
    for r in range(2):
        for c in range(3):
            row = [math.sin(r), math.sin(0.01 * r), math.cos(r), math.cos(0.01 * r)]
            col = [math.sin(c), math.sin(0.01 * c), math.cos(c), math.cos(0.01 * c)]
            torch.testing.assert_close(grid.positions[r * 3 + c], torch.tensor(row + col))
    sequence = FlowTransformer(5, 6, None, 3, dim=8, num_layers=1, num_heads=2)
    torch.testing.assert_close(sequence.positions, sinusoidal_embedding(torch.arange(6), 8))


def test_positions_are_fixed_full_strength_and_not_in_the_state():
    network = FlowTransformer(64, (4, 12), 16, dim=32, num_layers=1, num_heads=2)
    # Every (sin, cos) pair has norm one: sqrt(dim / 2) per token, from the first step on.
    torch.testing.assert_close(network.positions.norm(dim=-1), torch.full((48,), math.sqrt(16)))
    assert all(p is not network.positions for p in network.parameters())
    assert "positions" not in network.state_dict()


def test_masked_context_tokens_give_the_output_of_the_real_ones_alone():
    torch.manual_seed(0)
    network = FlowTransformer(5, (2, 3), 7, dim=16, num_layers=2, num_heads=2).double()
    with torch.no_grad():  # every weight N(0, 0.3): the near-zero starts would hide what reaches the output
        for p in network.parameters():
            p.normal_(0, 0.3)
    tokens, t = torch.randn(3, 6, 5, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    context = 20 * torch.randn(3, 6, 7, dtype=torch.float64)  # loud padding, so reading it would show
    real = torch.tensor([4, 2, 6])
    mask = torch.arange(6)[None, :] < real[:, None]  # (3, 6): 4, 2 and 6 real tokens
    masked = network(tokens, t, context=context, context_mask=mask)
    for i, n in enumerate(real.tolist()):  # each item against its real tokens alone, no mask
        alone = network(tokens[i : i + 1], t[i : i + 1], context=context[i : i + 1, :n])
        torch.testing.assert_close(masked[i : i + 1], alone)
    assert (network(tokens, t, context=context)[:2] - masked[:2]).abs().max() > 1e-3  # unmasked, the padding is read


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="divisible by 4"):
        FlowTransformer(4, (2, 2), None, dim=6, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="at least one token"):
        FlowTransformer(4, 0, None, dim=8, num_layers=1, num_heads=2)
    network = FlowTransformer(4, 3, None, dim=8, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="4 tokens; the network's layout holds at most 3"):
        network(torch.zeros(1, 4, 4), torch.zeros(1))

    with pytest.raises(ValueError, match="conv_kernel needs a grid layout"):
        FlowTransformer(4, 3, None, dim=8, num_layers=1, num_heads=2, conv_kernel=3)


@pytest.mark.parametrize(("conv_kernel", "reach"), [(0, 0), (3, 2), (5, 4)])
def test_without_attention_a_patch_reaches_as_far_as_the_convolutions(conv_kernel, reach):
    # Attention silenced (its output projection zero), a change of one patch reaches the patches
    # within num_layers * (k // 2) of it (Chebyshev distance) through the MLPs' convolutions, and
    # only itself through DiT's plain MLPs.
    torch.manual_seed(0)
    network = FlowTransformer(4, (5, 11), None, dim=16, num_layers=2, num_heads=2, conv_kernel=conv_kernel).double()
    with torch.no_grad():
        for block in network.blocks:
            block.attn.o_proj.weight.zero_()
            block.modulation.bias.normal_()  # open the gates: near-zero ones would hide the reach in rounding
        network.out_proj.weight.normal_()
    x, t = torch.randn(1, 55, 4, dtype=torch.float64), torch.rand(1, dtype=torch.float64)
    moved = x.clone()
    moved[0, 2 * 11 + 5] += 1.0  # patch (2, 5)
    change = (network(moved, t) - network(x, t)).abs().amax(-1)[0]  # (55,)
    changed = (change > 1e-12 * change.max()).reshape(5, 11)  # float64: chained small weights stay above rounding
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(11), indexing="ij")
    within = torch.maximum((rows - 2).abs(), (cols - 5).abs()) <= reach
    assert torch.equal(changed, within)


PATCH, ROWS, COLS, BAR = 4, 2, 8, 3  # 8 x 32 images; a bar covers 3 neighbouring patches of one row


def _bars(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, 8, 32) black images, each with one white bar of BAR patches at a random place."""
    images = torch.full((count, 1, ROWS * PATCH, COLS * PATCH), -1.0)
    rows = torch.randint(ROWS, (count,), generator=generator)
    starts = torch.randint(COLS - BAR + 1, (count,), generator=generator)
    for i, (r, c) in enumerate(zip(rows.tolist(), starts.tolist())):
        images[i, :, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + BAR) * PATCH] = 1.0
    return images


def _is_a_bar(image: torch.Tensor) -> bool:
    """One row holds exactly BAR neighbouring inked patches and nothing else is inked."""
    inked = rearrange(image, "1 (h p) (w q) -> h w (p q)", p=PATCH, q=PATCH).mean(-1) > 0  # (ROWS, COLS)
    if int(inked.sum()) != BAR or int(inked.any(dim=1).sum()) != 1:
        return False
    columns = inked.any(dim=0).nonzero().flatten()
    return int(columns[-1] - columns[0]) == BAR - 1


@pytest.mark.slow
def test_a_small_flow_draws_whole_bars_at_random_places():
    # Where the bar lies is random, so a patch must read the others to know whether it is inked:
    # patches drawn on their own (no position signal, uniform attention) give scattered pieces.
    # Measured at these settings: 25 of 64 whole bars; 2 of 64 with the learned N(0, 0.02) table
    # this network had before (BENCHMARKS.md, "The flow image head drew patches on their own").
    torch.manual_seed(0)
    network = FlowTransformer(PATCH * PATCH, (ROWS, COLS), None, dim=64, num_layers=2, num_heads=4)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)

    def velocity(x, t):  # (B, 1, 8, 32) -> the same, through patch tokens
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=PATCH, q=PATCH)
        return rearrange(network(tokens, t), "b (h w) (c p q) -> b c (h p) (w q)", h=ROWS, p=PATCH, q=PATCH)

    for _ in range(400):
        data = _bars(64, g)
        noise, t = torch.randn(data.shape, generator=g), torch.rand(64, generator=g)
        loss = flow_matching_loss(velocity(interpolate(noise, data, t), t), target_velocity(noise, data))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        drawn = integrate(velocity, torch.randn(64, 1, ROWS * PATCH, COLS * PATCH, generator=g), steps=8, sampler="heun")
    assert sum(_is_a_bar(image) for image in drawn) >= 0.2 * len(drawn)
