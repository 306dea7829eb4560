"""VAETokenizer and the Gaussian KL: KL against torch.distributions, reparameterisation, encode/decode
against the forward pass, training-step contract, safetensors round trip; latent diffusion's scale
by hand and its unit-spread property."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributions import Normal, kl_divergence

from polymodal.losses.kl import gaussian_kl
from polymodal.models.output import StepOutput
from polymodal.tokenizers import IMAGE_TOKENIZERS
from polymodal.tokenizers.vae import GaussianLatent, VAETokenizer, measure_latent_scale

SMALL = dict(channels=16, num_res_blocks=1, dim=4)


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 32, 96, generator=gen) * 2 - 1


def test_gaussian_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 5, generator=gen), torch.randn(3, 4, 2, 5, generator=gen)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))  # the prior itself


def test_gaussian_kl_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_reparameterised_sample_has_the_posterior_moments_and_gradients() -> None:
    torch.manual_seed(0)
    mean = torch.full((20000,), 1.5, requires_grad=True)
    logvar = torch.full((20000,), 2 * torch.log(torch.tensor(0.5)).item(), requires_grad=True)
    sample = GaussianLatent(mean=mean, logvar=logvar).sample()
    assert sample.mean().item() == pytest.approx(1.5, abs=0.02)
    assert sample.std().item() == pytest.approx(0.5, abs=0.02)
    sample.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(20000))  # d z / d mean = 1
    # d z / d logvar = 0.5 * sigma * noise, and noise = (z - mean) / sigma.
    torch.testing.assert_close(logvar.grad, 0.5 * (sample.detach() - 1.5))


def test_encode_decode_shapes_and_equal_the_eval_forward() -> None:
    torch.manual_seed(0)
    model = VAETokenizer(**SMALL).eval()
    images = _images()
    latents = model.encode(images)
    assert latents.shape == (2, 4, 8, 24)
    out = model(images)
    torch.testing.assert_close(model.decode(latents), out.reconstructions, rtol=0, atol=0)
    torch.testing.assert_close(model.reconstruct(images), out.reconstructions, rtol=0, atol=0)
    assert not torch.equal(model.encode(images, sample=True), latents)


def test_training_step_contract_and_kl_normalisation() -> None:
    torch.manual_seed(0)
    model = VAETokenizer(**SMALL).train()
    images = _images()
    out = model.training_step(images)
    assert isinstance(out, StepOutput)
    assert set(out.losses) == {"reconstruction", "kl"}
    assert set(out.metrics) == {"psnr", "kl_nats"}
    # kl is nats per image element: the per-image KL divided by C*H*W.
    assert out.metrics["kl_nats"] == pytest.approx(out.losses["kl"].item() * 32 * 96, rel=1e-6)
    sum(out.losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_kl_term_equals_the_pure_function_on_the_posterior() -> None:
    torch.manual_seed(0)
    model = VAETokenizer(**SMALL).eval()
    images = _images()
    out = model(images)
    expected = gaussian_kl(out.latent.mean, out.latent.logvar).mean() / images[0].numel()
    torch.testing.assert_close(out.losses["kl"], expected)


def test_safetensors_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = VAETokenizer(**SMALL).eval()
    path = tmp_path / "vae.safetensors"
    save_file(model.state_dict(), str(path))
    restored = IMAGE_TOKENIZERS.build({"name": "vae", **SMALL})
    restored.load_state_dict(load_file(str(path)))
    restored.eval()
    images = _images(seed=3)
    assert torch.equal(restored.reconstruct(images), model.reconstruct(images))


def test_clear_errors() -> None:
    model = VAETokenizer(**SMALL)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 1, 33, 96))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 8, 24))


def test_the_latent_scale_is_the_std_of_every_element() -> None:
    latents = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]])  # (1, 2, 1, 2): mean 4, squared deviations 9 + 1 + 1 + 9
    assert measure_latent_scale(latents).item() == pytest.approx((20.0 / 3.0) ** 0.5)  # unbiased: / (n - 1)
    assert measure_latent_scale(latents).dtype == torch.float64
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(64, 8, 4, 12, generator=gen) * 7.5 + 2.0
    scaled = wide / measure_latent_scale(wide)
    assert scaled.double().std().item() == pytest.approx(1.0, abs=1e-6)
    assert measure_latent_scale(wide * 3).item() == pytest.approx(3 * measure_latent_scale(wide).item())


def test_a_vaes_scaled_latents_round_trip_to_its_reconstruction() -> None:
    vae = VAETokenizer(**SMALL).eval()
    images = _images(batch=4)
    latents = vae.encode(images)
    scale = measure_latent_scale(latents)
    # What a latent flow head trains on, and what it decodes: the same reconstruction.
    torch.testing.assert_close(vae.decode((latents / scale).float() * scale.float()), vae.reconstruct(images), rtol=1e-5, atol=1e-5)


def test_constant_latents_have_no_scale() -> None:
    with pytest.raises(ValueError, match="constant or not finite"):
        measure_latent_scale(torch.zeros(2, 4, 1, 3))
    with pytest.raises(ValueError, match="at least 2 elements"):
        measure_latent_scale(torch.ones(1, 1, 1, 1))
