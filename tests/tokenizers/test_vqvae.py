"""VQVAETokenizer: encode/decode against the forward pass, training-step contract, safetensors round
trip, registry and errors, PSNR by hand, and a short fit that must lower the loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymodal.errors import ConfigError
from polymodal.models.output import StepOutput
from polymodal.tokenizers import IMAGE_TOKENIZERS
from polymodal.tokenizers.vqvae import VQVAETokenizer, psnr

SMALL = dict(channels=16, num_res_blocks=1, dim=8, num_codes=32)


def _images(batch: int = 2, height: int = 32, width: int = 96, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]: blurred noise, so a small model has something to learn."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 1, height // 8, width // 8, generator=gen)
    return torch.nn.functional.interpolate(noise, size=(height, width), mode="bilinear") * 2 - 1


@pytest.mark.parametrize("num_downsamples", [1, 2, 3])
def test_shapes_follow_the_downsampling(num_downsamples: int) -> None:
    model = VQVAETokenizer(num_downsamples=num_downsamples, **SMALL).eval()
    images = _images()
    factor = 2**num_downsamples
    indices = model.encode(images)
    assert indices.shape == (2, 32 // factor, 96 // factor)
    assert model.token_grid(32, 96) == indices.shape[1:]
    assert indices.dtype == torch.int64 and 0 <= int(indices.min()) and int(indices.max()) < 32
    assert model.decode(indices).shape == images.shape


def test_decode_of_encode_equals_the_forward_reconstruction() -> None:
    torch.manual_seed(0)
    model = VQVAETokenizer(**SMALL).eval()
    images = _images()
    out = model(images)
    indices = model.encode(images)
    assert torch.equal(indices, out.indices)
    torch.testing.assert_close(model.decode(indices), out.reconstructions, rtol=0, atol=0)
    torch.testing.assert_close(model.reconstruct(images), out.reconstructions, rtol=0, atol=0)


def test_encode_and_reconstruct_leave_the_state_alone() -> None:
    model = VQVAETokenizer(**SMALL).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reconstruct(_images())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ema", [True, False])
def test_training_step_contract_and_a_gradient_on_every_parameter(ema: bool) -> None:
    torch.manual_seed(0)
    model = VQVAETokenizer(ema=ema, **SMALL).train()
    out = model.training_step(_images())
    assert isinstance(out, StepOutput)
    expected = {"reconstruction", "commitment"} | (set() if ema else {"codebook"})
    assert set(out.losses) == expected
    assert set(out.metrics) == {"psnr", "perplexity", "code_usage", "dead_restarted"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.losses.values())
    assert all(isinstance(v, float) for v in out.metrics.values())
    sum(out.losses.values()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_reconstruction_loss_is_the_pixel_mse() -> None:
    model = VQVAETokenizer(**SMALL).eval()
    images = _images()
    out = model(images)
    torch.testing.assert_close(out.losses["reconstruction"], ((out.reconstructions - images) ** 2).mean())


def test_safetensors_round_trip_keeps_the_codes_and_the_pixels(tmp_path) -> None:
    torch.manual_seed(0)
    model = VQVAETokenizer(**SMALL).train()
    model.training_step(_images(seed=1))  # move the EMA codebook and its statistics off their init
    path = tmp_path / "tokenizer.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(1)
    restored = VQVAETokenizer(**SMALL)
    restored.load_state_dict(load_file(str(path)))
    model.eval()
    restored.eval()
    images = _images(seed=2)
    assert torch.equal(restored.encode(images), model.encode(images))
    assert torch.equal(restored.reconstruct(images), model.reconstruct(images))
    assert set(load_file(str(path))) >= {"quantizer.codebook", "quantizer.cluster_size", "quantizer.code_sum"}


def test_registry_builds_checks_keys_and_builds_on_meta() -> None:
    assert {"vqvae", "vae"} <= set(IMAGE_TOKENIZERS.names())
    model = IMAGE_TOKENIZERS.build({"name": "vqvae", **SMALL, "code_dim": 4, "cosine": True})
    assert isinstance(model, VQVAETokenizer) and model.quantizer.code_dim == 4
    with pytest.raises(ConfigError, match="num_codes"):
        IMAGE_TOKENIZERS.build({"name": "vqvae", "codebook_size": 8})
    with torch.device("meta"):
        meta = IMAGE_TOKENIZERS.build({"name": "vqvae"})
    assert all(p.is_meta for p in meta.parameters())


def test_clear_errors_for_bad_inputs() -> None:
    model = VQVAETokenizer(**SMALL)
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.zeros(1, 1, 30, 96))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model.encode(torch.zeros(1, 3, 32, 96))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 8, 24), 32))


def test_psnr_by_hand() -> None:
    images = torch.rand(3, 1, 8, 8) * 1.6 - 0.8
    # An error of 0.2 on [-1, 1] is 0.1 on [0, 1]: mse 0.01, 20 dB.
    torch.testing.assert_close(psnr(images + 0.2, images), torch.full((3,), 20.0, dtype=torch.float64))
    # Reconstructions are clamped to [-1, 1] first: overshooting white costs nothing.
    white = torch.ones(1, 1, 4, 4)
    assert psnr(white * 3, white).item() == pytest.approx(100.0)


def test_a_short_fit_lowers_the_reconstruction_loss() -> None:
    torch.manual_seed(0)
    model = VQVAETokenizer(**SMALL).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = _images(batch=8)
    losses = []
    for _ in range(40):
        out = model.training_step(images)
        loss = out.losses["reconstruction"] + 0.25 * out.losses["commitment"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(out.losses["reconstruction"].item())
    assert losses[-1] < 0.5 * losses[0]
