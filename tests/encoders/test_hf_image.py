"""The Hugging Face image encoder on tiny random ViT, DINOv2 (with and without registers), CLIP and
SigLIP models saved to a temporary folder: tokens and intermediates equal transformers' own forward
at the chosen layer, our torch preprocessing equals each family's image processor (and Pillow's
float resize exactly), the prefix tokens, freezing policies, and the errors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub during the tests

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

transformers = pytest.importorskip("transformers")

from polymodal.backbones.hf_causal_lm import apply_freeze_policy  # noqa: E402
from polymodal.encoders import ENCODERS  # noqa: E402
from polymodal.encoders.hf_image import HFImageEncoder  # noqa: E402
from polymodal.errors import ConfigError  # noqa: E402

IMAGE = (16, 24)  # the library's (H, W): wider than tall, like the built-in numbers
LAYERS = 3
TOWER = dict(hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=16, patch_size=4)
PIL_FILTERS = {2: Image.Resampling.BILINEAR, 3: Image.Resampling.BICUBIC}


def _families():
    t = transformers
    vit_like = dict(TOWER, intermediate_size=32)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return {
        "vit": (t.ViTModel(t.ViTConfig(**vit_like)), t.ViTImageProcessor(size={"height": 16, "width": 16})),
        "dinov2": (
            t.Dinov2Model(t.Dinov2Config(**TOWER, mlp_ratio=2)),
            t.BitImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}),
        ),
        "dinov2_registers": (
            t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**TOWER, mlp_ratio=2, num_register_tokens=2)),
            t.BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        ),
        "clip": (  # a full CLIP checkpoint: the encoder keeps its vision tower
            t.CLIPModel(
                t.CLIPConfig(
                    text_config=text,
                    vision_config=vit_like,
                    projection_dim=8,
                )
            ),
            t.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        ),
        "siglip": (
            t.SiglipVisionModel(t.SiglipVisionConfig(**vit_like)),
            t.SiglipImageProcessor(size={"height": 16, "width": 16}),
        ),
        "siglip_full": (  # a full SigLIP checkpoint: its vision tower, without the pooling head
            t.SiglipModel(t.SiglipConfig(text_config=text, vision_config=vit_like)),
            t.SiglipImageProcessor(size={"height": 16, "width": 16}),
        ),
    }


PREFIX = {"vit": 1, "dinov2": 1, "dinov2_registers": 3, "clip": 1, "siglip": 0, "siglip_full": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    out = {}
    for name, (model, processor) in _families().items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        out[name] = str(folder)
    return out


def _reference(folder: str):
    """transformers' own model from the same folder, untouched (vision tower of a full CLIP)."""
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return getattr(model, "vision_model", model)


def _images(batch: int = 2, channels: int = 1) -> torch.Tensor:
    """Smooth strokes on black, on the 8-bit grid (what a processor reads), normalised to [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    raw = (torch.rand(batch, channels, *IMAGE, generator=g) > 0.8).float().numpy()
    smooth = ndimage.gaussian_filter(raw, (0, 0, 1.0, 1.0)) * 2.5
    pixels = np.round(np.clip(smooth, 0, 1) * 255) / 255
    return torch.from_numpy(pixels).float() * 2 - 1


def _as_uint8_rgb(images: torch.Tensor) -> list[np.ndarray]:
    pixels = np.round((images.numpy() + 1) / 2 * 255).astype(np.uint8)  # (B, C, H, W)
    return [np.repeat(p.transpose(1, 2, 0), 3 // p.shape[0], axis=2) for p in pixels]


@pytest.mark.parametrize("layer", [-1, 2])
@pytest.mark.parametrize("family", list(PREFIX))
def test_tokens_equal_transformers_at_the_chosen_layer(folders, family, layer):
    encoder = ENCODERS.build({"name": "hf_image", "path": folders[family], "layer": layer}, 1, IMAGE).eval()
    images = _images()
    reference = _reference(folders[family])
    with torch.no_grad():
        out = encoder(images)
        inter = encoder.forward_intermediates(images)
        theirs = reference(pixel_values=encoder.preprocess(images), output_hidden_states=True)
    expected = theirs.last_hidden_state if layer == -1 else theirs.hidden_states[layer]
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)
    assert out.mask is None and out.tokens.shape[-1] == encoder.dim_out == 16
    kept = LAYERS if layer == -1 else layer
    assert len(inter.hidden) == kept == encoder.trunk.num_layers
    torch.testing.assert_close(inter.output.tokens, out.tokens, atol=0, rtol=0)
    for k, hidden in enumerate(inter.hidden[:-1], start=1):  # the last may differ by the final norm
        torch.testing.assert_close(hidden, theirs.hidden_states[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(PREFIX))
def test_cls_token_false_drops_the_prefix_tokens(folders, family):
    images = _images()
    with torch.no_grad():
        kept = HFImageEncoder(1, IMAGE, path=folders[family]).eval()(images).tokens
        dropped = HFImageEncoder(1, IMAGE, path=folders[family], cls_token=False).eval()(images).tokens
    torch.testing.assert_close(dropped, kept[:, PREFIX[family] :], atol=0, rtol=0)
    assert dropped.shape[1] == 16  # (16 / 4)^2 patches whatever the prefix


@pytest.mark.parametrize("fit", ["processor", "pad"])
@pytest.mark.parametrize("family", ["vit", "dinov2", "clip", "siglip"])
def test_preprocessing_equals_the_image_processor(folders, family, fit):
    processor = transformers.AutoImageProcessor.from_pretrained(folders[family], local_files_only=True)
    encoder = HFImageEncoder(1, IMAGE, path=folders[family], fit=fit)
    images = _images(batch=3)
    ours = encoder.preprocess(images).numpy()
    inputs = _as_uint8_rgb(images)
    if fit == "pad":  # black bars above and below: the square the processor is then given
        inputs = [np.pad(x, ((4, 4), (0, 0), (0, 0))) for x in inputs]
    theirs = processor(images=inputs, return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape
    # In 8-bit pixel units: Pillow resizes 8-bit images with a rounding between its two passes,
    # which moves a pixel by up to a few levels; on average the two agree to a fraction of one.
    std = np.asarray(processor.image_std).reshape(1, 3, 1, 1)
    gap = np.abs(ours - theirs) * std * 255
    assert gap.max() < 4.5 and gap.mean() < 0.5


@pytest.mark.parametrize("resample", [2, 3])
@pytest.mark.parametrize("size", [{"height": 40, "width": 28}, {"shortest_edge": 10}])
def test_resize_equals_pillows_float_resize(tmp_path, resample, size):
    """Without Pillow's 8-bit rounding, the resize filters agree to float precision (up and down,
    wide and tall, to a fixed size and to a shortest edge)."""
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**dict(TOWER, intermediate_size=32))).save_pretrained(tmp_path)
    processor = transformers.ViTImageProcessor(size=size, resample=resample, do_normalize=False, do_rescale=False)
    processor.save_pretrained(tmp_path)
    encoder = HFImageEncoder(1, IMAGE, path=str(tmp_path), fit="processor")
    images = _images(batch=1) * 0.6  # inside (-1, 1): bicubic overshoot never reaches the clamps
    ours = encoder.preprocess(images)[0, 0].numpy()  # do_rescale off: 8-bit scale (0..255)
    grey = ((images[0, 0].numpy() + 1) / 2 * 255).astype(np.float32)
    height, width = ours.shape
    theirs = np.asarray(Image.fromarray(grey, mode="F").resize((width, height), PIL_FILTERS[resample]))
    np.testing.assert_allclose(ours, np.clip(theirs, 0, 255), atol=2e-3)


def test_freezing_policies(folders):
    frozen = HFImageEncoder(1, IMAGE, path=folders["vit"])
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not any(m.training for m in frozen.model.modules())  # dropout off everywhere

    last = HFImageEncoder(1, IMAGE, path=folders["vit"], freeze="last_n", last_n=1).train()
    trainable = {n for n, p in last.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.layernorm.")) for n in trainable)
    assert {"model.layernorm.weight", "model.layernorm.bias"} <= trainable  # the final norm after the last block
    assert last.model.layers[2].training and not last.model.layers[0].training and not last.model.embeddings.training
    last(_images()).tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in last.named_parameters() if n in trainable)

    full = HFImageEncoder(1, IMAGE, path=folders["vit"], freeze="full")
    assert all(p.requires_grad for p in full.parameters())
    assert not any("pooler" in n for n, _ in full.named_parameters())  # the pooler is dropped


def test_a_frozen_encoder_stays_frozen_under_the_models_freezing_policy(folders):
    model = nn.Module()
    model.inputs = nn.Module()  # as an AnyToAnyModel holds them
    model.inputs.encoders = nn.ModuleDict({"image": HFImageEncoder(1, IMAGE, path=folders["vit"], freeze="last_n", last_n=1)})
    model.inputs.projectors = nn.ModuleDict({"image": nn.Linear(16, 8)})
    model.backbone = nn.Linear(8, 8)
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    apply_freeze_policy(model, "full")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before | {"backbone.weight", "backbone.bias"}


def test_errors_name_the_key(folders, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.encoders\.image\.path.*nothing is downloaded"):
        HFImageEncoder(1, IMAGE, path="google/vit-base-patch16-224")
    with pytest.raises(ConfigError, match=r"model\.encoders\.image\.layer=4.*1\.\.3"):
        HFImageEncoder(1, IMAGE, path=folders["vit"], layer=4)
    with pytest.raises(ConfigError, match="valid: frozen, last_n, full"):
        HFImageEncoder(1, IMAGE, path=folders["vit"], freeze="yes")
    with pytest.raises(ConfigError, match=r"last_n=3.*1\.\.2"):
        HFImageEncoder(1, IMAGE, path=folders["vit"], freeze="last_n", last_n=3, layer=2)
    with pytest.raises(ConfigError, match="valid: pad, processor"):
        HFImageEncoder(1, IMAGE, path=folders["vit"], fit="crop")
    transformers.ViTModel(transformers.ViTConfig(**dict(TOWER, intermediate_size=32))).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        HFImageEncoder(1, IMAGE, path=str(tmp_path))
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20)).save_pretrained(gpt2)
    transformers.ViTImageProcessor().save_pretrained(gpt2)
    with pytest.raises(ConfigError, match="holds a 'gpt2' model"):
        HFImageEncoder(1, IMAGE, path=str(gpt2))


def test_builds_on_the_meta_device_with_the_same_shapes(folders):
    encoder = HFImageEncoder(1, IMAGE, path=folders["clip"], layer=2)
    with torch.device("meta"):
        meta = HFImageEncoder(1, IMAGE, path=folders["clip"], layer=2)
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in encoder.named_parameters()}
