"""Shared-private factorisation: every named loss equals a dense reference computed here from the
module's own projection weights, for each alignment and independence choice."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from polymodal.decoupling import DECOUPLERS
from polymodal.errors import ConfigError
from polymodal.losses.alignment import barlow_twins, dcca, vicreg
from polymodal.losses.independence import hsic
from polymodal.modality import Modality

DIM = 12
MODALITIES = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)
NAMES = {(Modality.IMAGE, Modality.TEXT): "image_text", (Modality.IMAGE, Modality.AUDIO): "image_audio",
         (Modality.TEXT, Modality.AUDIO): "audio_text"}


def _module(**settings):
    torch.manual_seed(0)
    spec = {"name": "shared_private", "dim_shared": 6, "dim_private": 5, **settings}
    module = DECOUPLERS.build(spec, DIM, MODALITIES).double()
    with torch.no_grad():  # larger weights than the 0.02 init, so every term is far from zero
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def _inputs(batch: int = 9):
    """Nine items; item 0 has one text token, items 1 and 4 no audio, item 2 no image."""
    generator = torch.Generator().manual_seed(3)
    sizes = {Modality.IMAGE: 5, Modality.TEXT: 3, Modality.AUDIO: 4}
    states = {m: torch.randn(batch, n, DIM, generator=generator, dtype=torch.float64) for m, n in sizes.items()}
    masks = {m: torch.ones(batch, n, dtype=torch.bool) for m, n in sizes.items()}
    masks[Modality.TEXT][0, 1:] = False
    masks[Modality.AUDIO][[1, 4]] = False  # items 1 and 4 have no audio
    masks[Modality.IMAGE][2] = False  # item 2 has no image
    return states, masks


def _reference(module, states, masks):
    """Masked means and the projections, written out densely from the module's weights."""
    hidden, shared, private, pooled = {}, {}, {}, {}
    for m in MODALITIES:
        weights = masks[m].double()
        hidden[m] = torch.einsum("bnd,bn->bd", states[m], weights) / weights.sum(dim=1, keepdim=True).clamp(min=1)
        shared[m] = hidden[m] @ module.to_shared.weight.T + module.to_shared.bias
        private[m] = hidden[m] @ module.to_private[m.value].weight.T + module.to_private[m.value].bias
        both = torch.cat([shared[m], private[m]], dim=1)
        fused = both @ module.fuse[m.value].weight.T + module.fuse[m.value].bias
        pooled[m] = fused / torch.sqrt(fused.square().mean(dim=1, keepdim=True) + 1e-6) * module.out_norm.weight
    return hidden, shared, private, pooled


def _cross_covariance(x, y):
    return ((x - x.mean(0)).T @ (y - y.mean(0)) / (x.shape[0] - 1)).square().sum()


def _info_nce(a, b, scale):
    logits = scale * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize(
    ("align", "independence"),
    [("info_nce", "cross_covariance"), ("dcca", "hsic_linear"), ("vicreg", "hsic_rbf"), ("barlow_twins", "cross_covariance")],
)
def test_named_losses_equal_a_dense_reference(align, independence):
    module = _module(align=align, independence=independence)
    states, masks = _inputs()
    out = module(states, masks)
    hidden, shared, private, pooled = _reference(module, states, masks)
    holds = {m: masks[m].any(dim=1) for m in MODALITIES}
    independent = {
        "cross_covariance": _cross_covariance,
        "hsic_linear": lambda x, y: hsic(x, y, kernel="linear"),
        "hsic_rbf": lambda x, y: hsic(x, y, kernel="rbf"),
    }[independence]
    aligned = {
        "info_nce": lambda a, b: _info_nce(a, b, module.logit_scale.log_scale.exp()),
        "dcca": dcca,
        "vicreg": vicreg,
        "barlow_twins": barlow_twins,
    }[align]
    expected = {}
    for m in MODALITIES:
        torch.testing.assert_close(out.shared[m], shared[m])
        torch.testing.assert_close(out.private[m], private[m])
        torch.testing.assert_close(out.pooled[m], pooled[m])
        rows = holds[m]
        both = torch.cat([shared[m], private[m]], dim=1)[rows]
        recon = both @ module.reconstruct[m.value].weight.T + module.reconstruct[m.value].bias
        expected[f"reconstruction_{m}"] = (recon - hidden[m][rows]).square().mean()
        expected[f"independence_{m}"] = independent(private[m][rows], shared[m][rows])
    for a, b in itertools.combinations(MODALITIES, 2):
        rows = holds[a] & holds[b]
        expected[f"align_{NAMES[a, b]}"] = aligned(shared[a][rows], shared[b][rows])
        expected[f"independence_{NAMES[a, b]}"] = independent(private[a][rows], private[b][rows])
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-9, atol=1e-12, msg=name)
    cosine = F.cosine_similarity(shared[Modality.IMAGE], shared[Modality.TEXT])[holds[Modality.IMAGE] & holds[Modality.TEXT]]
    assert out.stats["shared_cosine_image_text"] == pytest.approx(cosine.mean().item())


def test_reconstruction_target_is_detached():
    module = _module()
    states, masks = _inputs()
    text = Modality.TEXT
    ours = states[text].clone().requires_grad_()
    out = module({**states, text: ours}, masks)
    grad = torch.autograd.grad(out.losses["reconstruction_text"], ours)[0]
    theirs = states[text].clone().requires_grad_()
    hidden, shared, private, _ = _reference(module, {**states, text: theirs}, masks)
    rows = masks[text].any(dim=1)
    recon = torch.cat([shared[text], private[text]], dim=1)[rows] @ module.reconstruct["text"].weight.T
    recon = recon + module.reconstruct["text"].bias
    detached = torch.autograd.grad((recon - hidden[text][rows].detach()).square().mean(), theirs, retain_graph=True)[0]
    attached = torch.autograd.grad((recon - hidden[text][rows]).square().mean(), theirs)[0]
    torch.testing.assert_close(grad, detached)
    assert not torch.allclose(grad, attached)  # the two differ, so the check can fail


def test_small_batches_skip_losses_and_bad_settings_fail():
    module = _module(independence="hsic_linear")
    states, masks = _inputs()
    # The first three items: too few for the unbiased HSIC (four rows).
    out = module({m: s[:3] for m, s in states.items()}, {m: k[:3] for m, k in masks.items()})
    assert not any(name.startswith("independence_") for name in out.losses)
    assert "reconstruction_text" in out.losses
    with pytest.raises(ValueError, match="align: unknown 'cca'; valid: info_nce, dcca, vicreg, barlow_twins"):
        _module(align="cca")
    with pytest.raises(ConfigError, match="unknown setting of decoupler 'shared_private'"):
        DECOUPLERS.check({"name": "shared_private", "kernel": "rbf"})
