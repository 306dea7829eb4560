"""The ``aligned_vq`` image head with blocks of codes (``group``): every code lands in one block
slot and back; the teacher-forced loss equals cross-entropy taken code by code from each slot's
own rows of the read-out; generation puts each slot's most likely code at its place in the grid;
[1, 1] is the head as it was; a group that does not tile the grid is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batches import SHAPES, make_batch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.heads.length_regulator import predicted_durations
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

GROUPS = [(1, 1), (2, 2), (1, 3)]


def _model(group, *overrides: str):
    head = f"{{name: aligned_vq, group: [{group[0]}, {group[1]}]}}"
    # two downsamples: an 8 x 24 code grid, which every group here tiles
    settings = ["model.tasks=[text_to_image]", f"model.heads.image={head}", "model.image_tokenizer.num_downsamples=2", *overrides]
    torch.manual_seed(0)
    return build_model(load_config(["tiny"], settings), SHAPES).eval()


def _grid_position(head, block: int, slot: int) -> tuple[int, int]:
    """The (row, column) of the code in slot ``slot`` of target token ``block``, by hand."""
    (gh, gw), blocks_wide = head.group, head.block_grid[1]
    return (block // blocks_wide) * gh + slot // gw, (block % blocks_wide) * gw + slot % gw


@pytest.mark.parametrize("group", GROUPS)
def test_every_code_lands_in_its_blocks_slot_and_back(group):
    head = _model(group).head(Modality.IMAGE)
    codes = torch.randint(0, head.num_codes, (2, *head.code_grid))
    blocks = head.to_blocks(codes)
    assert blocks.shape == (2, head.block_grid[0] * head.block_grid[1], group[0] * group[1])
    for block in range(blocks.shape[1]):
        for slot in range(blocks.shape[2]):
            row, column = _grid_position(head, block, slot)
            assert torch.equal(blocks[:, block, slot], codes[:, row, column])
    assert torch.equal(head.to_grid(blocks), codes)


@pytest.mark.parametrize("group", GROUPS)
def test_the_loss_is_cross_entropy_code_by_code_through_each_slots_read_out(group):
    model = _model(group)
    head, trunk = model.head(Modality.IMAGE), model
    torch.nn.init.normal_(head.code_head.weight)  # logits far from uniform, so a mispaired code shows
    batch = make_batch()
    target = batch.references[Modality.IMAGE]
    source, source_mask = model.encode(Modality.TEXT, target.ids, target.mask)
    codes = torch.randint(0, head.num_codes, (len(source), *head.code_grid))  # every code distinct in place
    head.tokenizer.encode = lambda values: codes  # (an untrained tokenizer gives noise nearly one code)
    with torch.no_grad():
        out = head.loss(trunk, source, source_mask, target)
        states = out.hidden[:, source.shape[1] :]  # one per block
    assert states.shape[1] == head.block_grid[0] * head.block_grid[1]
    slots, weight = head.group_size, head.code_head.weight  # (slots * K, D)
    total = 0.0
    for block in range(states.shape[1]):
        for slot in range(slots):
            rows = weight[slot * head.num_codes : (slot + 1) * head.num_codes]
            row, column = _grid_position(head, block, slot)
            total += F.cross_entropy(states[:, block] @ rows.T, codes[:, row, column], reduction="sum")
    torch.testing.assert_close(out.losses[""], total / codes.numel(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group", GROUPS)
def test_generation_puts_each_slots_most_likely_code_at_its_place(group):
    model = _model(group)
    head, trunk = model.head(Modality.IMAGE), model
    batch = make_batch()
    source, source_mask = model.encode(Modality.TEXT, batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT])
    drawn = head.generate_codes(trunk, source, source_mask)
    assert drawn.shape == (len(source), *head.code_grid)
    with torch.no_grad():
        widths = predicted_durations(head.width_head, trunk, source, source_mask)
        states = head._code_states(trunk, source, source_mask, widths)[:, source.shape[1] :]
    for block in range(states.shape[1]):
        logits = head.code_head(states[:, block]).view(len(source), -1, head.num_codes)
        for slot in range(logits.shape[1]):
            row, column = _grid_position(head, block, slot)
            assert torch.equal(drawn[:, row, column], logits[:, slot].argmax(-1))


def test_one_code_per_token_is_the_head_as_it_was():
    """[1, 1]: one target token per code, a read-out of ``num_codes`` rows (checkpoints load as before)."""
    head = _model((1, 1)).head(Modality.IMAGE)
    assert head.block_grid == head.code_grid
    assert head.code_head.weight.shape == (head.num_codes, head.row_embed.embedding_dim)
    assert head.row_embed.num_embeddings == head.code_grid[0]


def test_a_group_that_does_not_tile_the_grid_is_refused():
    with pytest.raises(ConfigError, match=r"model.heads.image.group: \[3, 2\]"):
        _model((3, 2))
