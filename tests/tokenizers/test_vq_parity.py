"""Parity with vector-quantize-pytorch's ``VectorQuantize`` given the same codebook and inputs:
same indices, same quantized output, same commitment loss, same encoder gradient, and the same
codebook after one EMA step (train mode) — for the Euclidean, cosine and projected variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.tokenizers.vector_quantizer import VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")

DIM, NUM_CODES, DECAY, EPS = 16, 64, 0.8, 1e-5
VARIANTS = {
    "euclidean": dict(),
    "cosine": dict(cosine=True),
    "projected": dict(code_dim=8),
}


def _pair(variant: str) -> tuple[VectorQuantizer, torch.nn.Module]:
    """Our quantizer and the peer with one codebook (and projections); EMA on, restarts off."""
    settings = VARIANTS[variant]
    ours = VectorQuantizer(DIM, num_codes=NUM_CODES, decay=DECAY, eps=EPS, restart_dead=False, **settings)
    peer = vqp.VectorQuantize(
        dim=DIM,
        codebook_size=NUM_CODES,
        codebook_dim=settings.get("code_dim"),
        decay=DECAY,
        eps=EPS,
        use_cosine_sim=settings.get("cosine", False),
        commitment_weight=1.0,
        threshold_ema_dead_code=0,
        rotation_trick=False,  # plain straight-through, as in arXiv:1711.00937
    )
    gen = torch.Generator().manual_seed(1)
    ours.load_codebook(torch.randn(NUM_CODES, ours.code_dim, generator=gen))
    with torch.no_grad():
        peer._codebook.embed.copy_(ours.codebook.unsqueeze(0))  # (1, K, code_dim): one codebook head
        peer._codebook.embed_avg.copy_(ours.code_sum.unsqueeze(0))
        peer._codebook.cluster_size.copy_(ours.cluster_size.unsqueeze(0))
        if ours.code_dim != DIM:
            peer.project_in.load_state_dict(ours.project_in.state_dict())
            peer.project_out.load_state_dict(ours.project_out.state_dict())
    return ours, peer


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step_matches_vector_quantize_pytorch(variant: str) -> None:
    ours, peer = _pair(variant)
    ours.train()
    peer.train()
    x = torch.randn(4, 50, DIM, generator=torch.Generator().manual_seed(2))
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()

    out = ours(x_ours)
    quantized, indices, _, breakdown = peer(x_peer, return_loss_breakdown=True)

    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.quantized, quantized)
    torch.testing.assert_close(out.losses["commitment"], breakdown.commitment)

    upstream = torch.randn(4, 50, DIM, generator=torch.Generator().manual_seed(3))
    (out.quantized * upstream).sum().backward()
    (quantized * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_peer.grad)

    # The EMA step that followed: counts, code sums and the Laplace-smoothed codebook.
    counts, sums = peer._codebook.cluster_size[0], peer._codebook.embed_avg[0]
    torch.testing.assert_close(ours.cluster_size, counts)
    torch.testing.assert_close(ours.code_sum, sums)
    # Laplace smoothing (Razavi et al. 2019, arXiv:1906.00446) of the peer's counts and sums, each
    # code then unit length in the cosine variant.
    total = counts.sum()
    codebook = sums / ((counts + EPS) / (total + NUM_CODES * EPS) * total)[:, None]
    torch.testing.assert_close(ours.codebook, F.normalize(codebook, dim=-1) if VARIANTS[variant].get("cosine") else codebook)
    if hasattr(vqp.vector_quantize_pytorch, "laplace_smoothing"):  # releases before 1.34 smooth so too
        torch.testing.assert_close(ours.codebook, peer._codebook.embed[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_lookup_and_decode_match_vector_quantize_pytorch(variant: str) -> None:
    ours, peer = _pair(variant)
    ours.eval()
    peer.eval()
    x = torch.randn(3, 40, DIM, generator=torch.Generator().manual_seed(4))
    out = ours(x)
    quantized, indices, _ = peer(x)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.quantized, quantized)
    torch.testing.assert_close(ours.decode_indices(indices), peer.get_output_from_indices(indices))
