"""Mel-frame head (Tacotron reduction factor) and the masked L1 + L2 mel loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.decoders.mel_head import MelFrameHead
from polymodal.losses.mel import mel_loss

DIM, NUM_MELS = 32, 16


@pytest.mark.parametrize("frames_per_token", [1, 4])
def test_head_shapes_and_frame_order(frames_per_token: int) -> None:
    torch.manual_seed(0)
    head = MelFrameHead(DIM, NUM_MELS, frames_per_token=frames_per_token)
    states = torch.randn(2, 5, DIM)
    frames = head(states)
    assert frames.shape == (2, 5 * frames_per_token, NUM_MELS)
    # The simple way: token n alone, its output cut into r frames of num_mels, gives frames n*r .. n*r+r-1.
    for n in range(5):
        alone = head.proj(states[:, n]).view(2, frames_per_token, NUM_MELS)
        torch.testing.assert_close(frames[:, n * frames_per_token : (n + 1) * frames_per_token], alone)


def test_frame_mask_follows_tokens() -> None:
    head = MelFrameHead(DIM, NUM_MELS, frames_per_token=3)
    token_mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = torch.tensor([[True] * 6 + [False] * 3, [True] * 3 + [False] * 6])
    assert torch.equal(head.frame_mask(token_mask), expected)


def test_head_builds_on_meta_and_gets_gradients() -> None:
    assert MelFrameHead(DIM, NUM_MELS, frames_per_token=2).to("meta")(torch.zeros(1, 3, DIM, device="meta")).shape == (
        1, 6, NUM_MELS,
    )  # fmt: skip
    with torch.device("meta"):
        MelFrameHead(DIM, NUM_MELS)  # init_weights is a no-op on meta
    head = MelFrameHead(DIM, NUM_MELS)
    head(torch.randn(2, 3, DIM)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert head.proj.weight.std().item() == pytest.approx(0.02, rel=0.1) and (head.proj.bias == 0).all()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(3, 7, NUM_MELS, generator=gen)
    target = torch.randn(3, 7, NUM_MELS, generator=gen)
    lengths = torch.tensor([7, 4, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (3, 7)
    return pred, target, mask


def test_mel_loss_equals_l1_plus_l2_over_real_frames() -> None:
    pred, target, mask = _batch()
    # The simple way: gather the real frames, then the library's mean L1 and mean squared error.
    expected = F.l1_loss(pred[mask], target[mask]) + F.mse_loss(pred[mask], target[mask])
    torch.testing.assert_close(mel_loss(pred, target, mask), expected)


def test_mel_loss_ignores_padded_frames() -> None:
    pred, target, mask = _batch()
    pred.requires_grad_(True)
    loss = mel_loss(pred, target, mask)
    (grad,) = torch.autograd.grad(loss, pred)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    # Anything in the padded frames, even inf and NaN, in either tensor: same loss, same gradient.
    garbage_pred = pred.detach().clone()
    garbage_pred[~mask] = float("nan")
    garbage_target = target.clone()
    garbage_target[~mask] = float("inf")
    garbage_pred.requires_grad_(True)
    again = mel_loss(garbage_pred, garbage_target, mask)
    (grad_again,) = torch.autograd.grad(again, garbage_pred)
    torch.testing.assert_close(again, loss.detach())
    torch.testing.assert_close(grad_again, grad)


def test_mel_loss_does_not_depend_on_padding_length() -> None:
    pred, target, mask = _batch()
    pad = (0, 0, 0, 5)  # five more padded frames
    longer = mel_loss(F.pad(pred, pad, value=3.0), F.pad(target, pad), F.pad(mask, (0, 5)))
    torch.testing.assert_close(longer, mel_loss(pred, target, mask))


def test_mel_loss_edge_cases() -> None:
    pred, target, mask = _batch()
    assert mel_loss(target, target, mask).item() == 0.0
    assert mel_loss(pred, target, torch.zeros_like(mask)).item() == 0.0
    # bf16 inputs are scored in fp32.
    assert mel_loss(pred.bfloat16(), target.bfloat16(), mask).dtype == torch.float32
    with pytest.raises(ValueError, match="mask"):
        mel_loss(pred, target, mask[:, :5])
