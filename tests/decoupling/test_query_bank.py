"""Query banks: private queries never see another modality (checked through outputs), the shared
bank is closed during the private phase, and the private losses equal a dense reference."""

from __future__ import annotations

import pytest
import torch

from polymodal.decoupling import DECOUPLERS
from polymodal.losses.alignment import barlow_twins, vicreg
from polymodal.modality import Modality

DIM = 16
MODALITIES = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)


def _bank(**settings):
    torch.manual_seed(0)
    spec = {"name": "query_bank", "num_private_queries": 3, "num_shared_queries": 2, **settings}
    return DECOUPLERS.build(spec, DIM, MODALITIES).double()


def _inputs(batch: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sizes = {Modality.IMAGE: 5, Modality.TEXT: 4, Modality.AUDIO: 7}
    states = {m: torch.randn(batch, n, DIM, generator=generator, dtype=torch.float64) for m, n in sizes.items()}
    masks = {m: torch.ones(batch, n, dtype=torch.bool) for m, n in sizes.items()}
    masks[Modality.TEXT][1, 2:] = False
    masks[Modality.AUDIO][2] = False  # item 2 has no audio
    masks[Modality.IMAGE][3, 4:] = False
    return states, masks


@pytest.mark.parametrize("progress", [0.0, 0.2])  # the private phase
def test_private_queries_never_see_another_modality(progress):
    bank = _bank()
    bank.set_progress(progress)
    states, masks = _inputs()
    base = bank(states, masks)
    bumped = dict(states)
    bumped[Modality.TEXT] = states[Modality.TEXT] + 5 * torch.randn_like(states[Modality.TEXT])
    out = bank(bumped, masks)
    for modality in (Modality.IMAGE, Modality.AUDIO):
        torch.testing.assert_close(out.token_sets[f"private_{modality}"], base.token_sets[f"private_{modality}"], rtol=0, atol=0)
        torch.testing.assert_close(out.private[modality], base.private[modality], rtol=0, atol=0)
        torch.testing.assert_close(out.pooled[modality], base.pooled[modality], rtol=0, atol=0)
    # The text outputs do change: the check is not vacuous.
    assert (out.private[Modality.TEXT] - base.private[Modality.TEXT]).abs().amax(dim=-1).min() > 1e-6
    # And the private attention puts exactly zero weight on other modalities' keys.
    private = base.attention["private"]
    foreign = (private.key_modality[:, None, :] != private.query_type[None, :, None]).expand_as(private.weights)
    assert foreign.any() and torch.equal(private.weights[foreign], torch.zeros_like(private.weights[foreign]))
    assert all(base.stats[f"leakage_{m}"] == 0.0 for m in MODALITIES)


def test_padding_does_not_change_private_outputs():
    bank = _bank()
    states, masks = _inputs()
    junk = dict(states)
    junk[Modality.TEXT] = states[Modality.TEXT].clone()
    junk[Modality.TEXT][~masks[Modality.TEXT]] = 1e3  # padded text slots hold junk
    torch.testing.assert_close(bank(junk, masks).private[Modality.TEXT], bank(states, masks).private[Modality.TEXT])


def test_shared_bank_is_closed_then_gated_open():
    bank = _bank(open_start=0.3, open_end=0.6)
    states, masks = _inputs()
    bank.set_progress(0.1)
    closed = bank(states, masks)
    assert closed.stats["gate"] == 0.0
    assert not closed.shared[Modality.IMAGE].requires_grad  # nothing trains through the closed bank
    torch.testing.assert_close(closed.pooled[Modality.IMAGE], bank.out_norm(closed.private[Modality.IMAGE]))
    bank.set_progress(0.45)
    half = bank(states, masks)
    assert half.stats["gate"] == pytest.approx(0.5)
    expected = bank.out_norm(half.private[Modality.IMAGE] + 0.5 * half.shared[Modality.IMAGE])
    torch.testing.assert_close(half.pooled[Modality.IMAGE], expected)
    assert half.shared[Modality.IMAGE].requires_grad
    # The shared bank reads each modality with one set of weights: equal inputs, equal outputs.
    same = {Modality.IMAGE: states[Modality.IMAGE], Modality.AUDIO: states[Modality.IMAGE]}
    same_masks = {Modality.IMAGE: masks[Modality.IMAGE], Modality.AUDIO: masks[Modality.IMAGE]}
    out = bank(same, same_masks)
    torch.testing.assert_close(out.shared[Modality.IMAGE], out.shared[Modality.AUDIO], rtol=0, atol=0)
    assert not torch.allclose(out.private[Modality.IMAGE], out.private[Modality.AUDIO])


@pytest.mark.parametrize("private_loss", ["vicreg", "barlow_twins"])
def test_private_losses_equal_a_dense_reference(private_loss):
    weight = 0.3  # private_weight multiplies every private term
    bank = _bank(private_loss=private_loss, private_weight=weight)
    states, masks = _inputs()
    out = bank(states, masks)
    holds = {m: masks[m].any(dim=1) for m in MODALITIES}
    for m in MODALITIES:
        rows = out.private[m][holds[m]]
        if private_loss == "vicreg":  # variance hinge + one covariance term; invariance of a view with itself is 0
            centred = rows - rows.mean(dim=0)
            cov = centred.T @ centred / (rows.shape[0] - 1)
            off = cov.square().sum() - cov.diagonal().square().sum()
            hinge = torch.relu(1 - torch.sqrt(rows.var(dim=0) + 1e-4)).mean()
            expected = 25.0 * hinge + off / DIM
            library = vicreg(rows, rows, invariance_weight=0.0, covariance_weight=0.5)
            torch.testing.assert_close(out.losses[f"private_{m}"], weight * library)
        else:
            expected = barlow_twins(rows, rows)
        torch.testing.assert_close(out.losses[f"private_{m}"], weight * expected)
    pairs = [
        (Modality.IMAGE, Modality.TEXT, "image_text"),
        (Modality.IMAGE, Modality.AUDIO, "image_audio"),
        (Modality.TEXT, Modality.AUDIO, "audio_text"),
    ]
    for a, b, name in pairs:
        both = holds[a] & holds[b]
        x, y = out.private[a][both], out.private[b][both]
        cross = (x - x.mean(dim=0)).T @ (y - y.mean(dim=0)) / (x.shape[0] - 1)  # (D, D) cross-covariance
        torch.testing.assert_close(out.losses[f"private_decorrelation_{name}"], weight * cross.square().sum())
    assert len(out.losses) == 6


def test_a_modality_alone_and_a_bad_setting():
    bank = _bank()
    states, masks = _inputs()
    alone = bank({Modality.TEXT: states[Modality.TEXT]}, {Modality.TEXT: masks[Modality.TEXT]})
    together = bank(states, masks)
    torch.testing.assert_close(alone.pooled[Modality.TEXT], together.pooled[Modality.TEXT], rtol=0, atol=0)
    assert set(alone.losses) == {"private_text"}
    with pytest.raises(ValueError, match="private_loss: unknown 'vicrag'; valid: vicreg, barlow_twins"):
        _bank(private_loss="vicrag")


def test_summaries_at_initialisation_carry_what_the_banks_read():
    """States with a large common part, as a backbone's are: at initialisation the bank summaries
    vary across items about as much as the masked mean does. Unit-scale queries (the constant part
    of every output) would leave them the same vector to half a percent."""
    torch.manual_seed(0)
    bank = DECOUPLERS.build({"name": "query_bank"}, 64, MODALITIES).double()
    generator = torch.Generator().manual_seed(1)
    common = torch.randn(1, 1, 64, generator=generator, dtype=torch.float64)
    states = {m: common + 0.3 * torch.randn(32, 6, 64, generator=generator, dtype=torch.float64) for m in MODALITIES}
    masks = {m: torch.ones(32, 6, dtype=torch.bool) for m in MODALITIES}
    out = bank(states, masks)

    def spread(vectors):  # (B, D): the batch std against the batch mean
        return float(vectors.std(dim=0).norm() / vectors.mean(dim=0).norm())

    for m in MODALITIES:
        mean_pool = spread(states[m].mean(dim=1))
        assert spread(out.private[m]) > 0.5 * mean_pool, m
        assert spread(out.shared[m]) > 0.5 * mean_pool, m


@pytest.mark.parametrize("backprop", [False, True])
def test_private_terms_reach_the_states_only_when_asked(backprop):
    bank = _bank(private_backprop=backprop)
    bank.set_progress(1.0)  # the shared bank open
    states, masks = _inputs()
    states = {m: s.requires_grad_() for m, s in states.items()}
    out = bank(states, masks)
    private = sum(v for k, v in out.losses.items() if k.startswith("private"))
    grads = torch.autograd.grad(private, list(states.values()), allow_unused=True)
    assert all((g is not None and g.abs().sum() > 0) == backprop for g in grads)
    # The shared summaries (InfoNCE's) always pass their gradient to the states.
    shared = torch.autograd.grad(sum(s.sum() for s in out.shared.values()), list(states.values()))
    assert all(g.abs().sum() > 0 for g in shared)
