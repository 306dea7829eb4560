"""VectorQuantizer: exact decode of indices, straight-through gradients, EMA by hand, dead-code restart."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.losses.vq import codebook_loss, commitment_loss
from polymodal.tokenizers.vector_quantizer import VectorQuantizer, codebook_usage, squared_distances

VARIANTS = {
    "ema": dict(ema=True),
    "gradient": dict(ema=False),
    "cosine_ema": dict(ema=True, cosine=True),
    "cosine_gradient": dict(ema=False, cosine=True),
    "projected": dict(ema=True, code_dim=4),
}


def _data_codebook(vq: VectorQuantizer, seed: int = 0) -> None:
    """A codebook on the scale of standard-normal inputs, so many codes are chosen."""
    gen = torch.Generator().manual_seed(seed)
    vq.load_codebook(torch.randn(vq.num_codes, vq.code_dim, generator=gen))


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_indices_gives_back_exactly_the_quantized_tensor(variant: str) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=32, **VARIANTS[variant]).eval()
    _data_codebook(vq)
    x = torch.randn(3, 5, 8)
    out = vq(x)
    assert out.indices.shape == (3, 5) and out.indices.dtype == torch.int64
    assert out.quantized.shape == x.shape
    assert torch.equal(vq.decode_indices(out.indices), out.quantized)
    assert torch.equal(vq.encode(x), out.indices)


def test_decode_indices_exact_in_training_when_the_codebook_does_not_move() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=16, ema=False, restart_dead=False).train()
    _data_codebook(vq)
    x = torch.randn(64, 8, requires_grad=True)
    out = vq(x)
    assert torch.equal(vq.decode_indices(out.indices), out.quantized.detach())


@pytest.mark.parametrize("variant", ["ema", "gradient"])
def test_straight_through_gradient_reaching_the_encoder_equals_the_gradient_at_the_output(variant: str) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=16, **VARIANTS[variant]).train()
    _data_codebook(vq)
    x = torch.randn(4, 6, 8, requires_grad=True)
    upstream = torch.randn(4, 6, 8)
    (vq(x).quantized * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)


def test_straight_through_through_projections_matches_the_chain_rule() -> None:
    """With code projections, the encoder gradient is project_in^T (project_out^T g): the lookup is skipped."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=16, code_dim=3).train()
    _data_codebook(vq)
    x = torch.randn(10, 8, requires_grad=True)
    upstream = torch.randn(10, 8)
    (vq(x).quantized * upstream).sum().backward()
    expected = upstream @ vq.project_out.weight @ vq.project_in.weight  # (10, 8) -> (10, 3) -> (10, 8)
    torch.testing.assert_close(x.grad, expected)


def test_squared_distances_match_cdist() -> None:
    gen = torch.Generator().manual_seed(0)
    x, codes = torch.randn(50, 7, generator=gen), torch.randn(20, 7, generator=gen)
    torch.testing.assert_close(squared_distances(x, codes), torch.cdist(x.double(), codes.double()).square().float())


def test_nearest_code_matches_brute_force() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(6, num_codes=40).eval()
    _data_codebook(vq)
    x = torch.randn(200, 6)
    brute = ((x[:, None, :] - vq.codebook[None]) ** 2).sum(-1).argmin(1)  # (200, 40) -> (200,)
    assert torch.equal(vq(x).indices, brute)


def test_ema_update_on_a_tiny_input_equals_the_hand_computed_result() -> None:
    vq = VectorQuantizer(2, num_codes=2, ema=True, decay=0.5, eps=0.5, restart_dead=False).train()
    vq.load_codebook(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # counts start at 1, code sums = codes
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 11.0]])
    out = vq(x)
    assert out.indices.tolist() == [0, 0, 1]
    # Quantized with the codebook before the update.
    assert torch.equal(out.quantized, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))
    # counts:     0.5 * [1, 1] + 0.5 * [2, 1]                      = [1.5, 1.0]
    # code sums:  0.5 * [[0, 0], [10, 10]] + 0.5 * [[3, 1], [9, 11]] = [[1.5, 0.5], [9.5, 10.5]]
    # smoothed:   (count + 0.5) / (2.5 + 2 * 0.5) * 2.5             = [10/7, 15/14]
    # codebook:   sums / smoothed                                   = [[1.05, 0.35], [133/15, 9.8]]
    torch.testing.assert_close(vq.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(vq.code_sum, torch.tensor([[1.5, 0.5], [9.5, 10.5]]))
    torch.testing.assert_close(vq.codebook, torch.tensor([[1.05, 0.35], [133 / 15, 9.8]]))


def test_gradient_codebook_learns_only_from_the_codebook_loss() -> None:
    vq = VectorQuantizer(2, num_codes=2, ema=False, restart_dead=False).train()
    vq.load_codebook(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 11.0]], requires_grad=True)
    out = vq(x)
    assert set(out.losses) == {"codebook", "commitment"}
    out.losses["commitment"].backward(retain_graph=True)
    assert vq.codebook.grad is None or torch.count_nonzero(vq.codebook.grad) == 0
    x.grad = None
    out.losses["codebook"].backward()
    assert x.grad is None  # and the codebook loss never reaches the encoder
    # d/de mean((e_i - x_i)^2) over 6 elements: 2 (e - x) / 6 summed per code.
    expected = torch.tensor(
        [[2 * ((0 - 1) + (0 - 2)) / 6, 2 * ((0 - 1) + (0 - 0)) / 6], [2 * (10 - 9) / 6, 2 * (10 - 11) / 6]]
    )
    torch.testing.assert_close(vq.codebook.grad, expected)


def test_loss_terms_equal_the_pure_functions() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=16, ema=False).eval()
    _data_codebook(vq)
    x = torch.randn(30, 8)
    out = vq(x)
    codes = vq.codebook[out.indices]
    torch.testing.assert_close(out.losses["commitment"], F.mse_loss(x, codes))
    torch.testing.assert_close(out.losses["codebook"], codebook_loss(x, codes))
    torch.testing.assert_close(out.losses["commitment"], commitment_loss(x, codes))


def test_a_dead_code_is_restarted_and_then_used() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(4, num_codes=3, decay=0.9, restart_dead=True, dead_threshold=1.0).train()
    far_away = torch.full((4,), 100.0)
    vq.load_codebook(torch.stack([torch.zeros(4), torch.ones(4), far_away]))
    x = torch.randn(64, 4) * 0.3
    first = vq(x)
    assert (first.indices != 2).all()  # nothing near the far code
    # Its count went 1 -> 0.9 < 1: restarted onto one of this batch's vectors.
    assert first.stats["dead_restarted"].item() >= 1
    assert vq.codebook[2].abs().max() < 100.0
    assert any(torch.equal(vq.codebook[2], row) for row in x)
    vq.eval()
    second = vq(x)
    assert (second.indices == 2).any()


def test_no_restart_when_disabled_or_in_eval() -> None:
    vq = VectorQuantizer(4, num_codes=3, ema=False, restart_dead=False).train()
    vq.load_codebook(torch.stack([torch.zeros(4), torch.ones(4), torch.full((4,), 100.0)]))
    out = vq(torch.randn(32, 4) * 0.3)
    assert out.stats["dead_restarted"].item() == 0
    assert torch.equal(vq.codebook[2], torch.full((4,), 100.0))
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(32, 4))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())


def test_codebook_usage_on_a_hand_made_histogram() -> None:
    perplexity, usage = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert perplexity.item() == pytest.approx(2.0)
    assert usage.item() == pytest.approx(0.5)
    perplexity, usage = codebook_usage(torch.arange(8), 8)
    assert perplexity.item() == pytest.approx(8.0)
    assert usage.item() == 1.0
    # Entropy of (3/4, 1/4) in nats, exponentiated.
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert codebook_usage(torch.tensor([[5, 5], [5, 2]]), 6)[0].item() == pytest.approx(expected)


def test_stats_match_codebook_usage_of_the_indices() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=32).eval()
    _data_codebook(vq)
    out = vq(torch.randn(100, 8))
    perplexity, usage = codebook_usage(out.indices, 32)
    assert out.stats["perplexity"].item() == pytest.approx(perplexity.item(), rel=1e-6)
    assert out.stats["code_usage"].item() == pytest.approx(usage.item())


def test_cosine_codes_stay_on_the_unit_sphere() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=16, cosine=True).train()
    for _ in range(3):
        vq(torch.randn(64, 8) * 5)
    torch.testing.assert_close(vq.codes().norm(dim=-1), torch.ones(16))


def test_bf16_inputs_are_looked_up_in_fp32() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, num_codes=64).eval()
    _data_codebook(vq)
    x = torch.randn(256, 8).bfloat16()
    out = vq(x)
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.indices, vq(x.float()).indices)


def test_clear_errors() -> None:
    vq = VectorQuantizer(8, num_codes=4)
    with pytest.raises(ValueError, match="width 8"):
        vq(torch.randn(3, 7))
    with pytest.raises(TypeError, match="integer"):
        vq.decode_indices(torch.zeros(3))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, decay=1.0)
    with pytest.raises(ValueError, match="shape"):
        vq.load_codebook(torch.zeros(5, 8))


def test_builds_on_meta_device() -> None:
    with torch.device("meta"):
        vq = VectorQuantizer(8, num_codes=16, code_dim=4)
    assert vq.codebook.is_meta
