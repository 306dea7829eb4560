"""Symmetric InfoNCE: the tiled form against the dense form, the dense form against open_clip's
``ClipLoss``, sharded (several-process) computation against the whole batch, hand-checked values,
and the learnable temperature."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polymodal.losses.contrastive import DEFAULT_TILE_SIZE, info_nce, info_nce_dense, info_nce_tiled
from polymodal.losses.temperature import LogitScale

NUM, DIM = 300, 32
REL_TOL = 1e-5  # the bar: forward and gradients within 1e-5 relative of the dense form


def _pairs(num: int = NUM, dim: int = DIM, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(num, dim) unit vectors a and b, b correlated with a so that the positives stand out."""
    gen = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1)
    b = F.normalize(a + 0.8 * torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def _loss_and_grads(loss_fn, a, b, scale):
    """(loss, grad a, grad b, grad scale or None) of ``loss_fn(a, b, scale)``."""
    loss = loss_fn(a, b, scale)
    inputs = [a, b] + ([scale] if isinstance(scale, torch.Tensor) and scale.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs)
    return (loss.detach(), *grads, *([None] * (3 - len(grads))))


def _assert_rel_close(actual, expected, tol=REL_TOL):
    """Every entry within ``tol`` of the largest magnitude of ``expected`` (a relative error that
    fp32 rounding of a tiny gradient entry cannot blow up)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    bound = tol * expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= bound, f"max abs error {err.item():.3e} > {bound.item():.3e}"


def _scale(learnable: bool, value: float = 1 / 0.07):
    return torch.tensor(value, requires_grad=True) if learnable else value


@pytest.mark.parametrize("learnable", [True, False], ids=["learnable-scale", "fixed-scale"])
@pytest.mark.parametrize("tile_size", [7, 64, 128, NUM, 512])  # 300 = 2 x 128 + 44: an uneven last tile
def test_tiled_equals_dense(tile_size, learnable):
    a, b = _pairs()
    scale = _scale(learnable)
    dense = _loss_and_grads(info_nce_dense, a, b, scale)
    tiled = _loss_and_grads(lambda a, b, s: info_nce_tiled(a, b, s, tile_size=tile_size), a, b, scale)
    for got, want in zip(tiled, dense):
        if want is None:
            assert got is None
        else:
            _assert_rel_close(got, want)
    assert dense[0] > 0


def test_both_forms_match_float64():
    """fp32 tiled and fp32 dense each within 1e-5 of the float64 dense value, at CLIP's maximum
    scale, where the logits span [-100, 100]."""
    a64, b64 = _pairs(dtype=torch.float64)
    exact = _loss_and_grads(info_nce_dense, a64, b64, torch.tensor(100.0, dtype=torch.float64, requires_grad=True))
    a, b = _pairs()
    for loss_fn in (info_nce_dense, lambda a, b, s: info_nce_tiled(a, b, s, tile_size=64)):
        got = _loss_and_grads(loss_fn, a, b, torch.tensor(100.0, requires_grad=True))
        for g, e in zip(got, exact):
            _assert_rel_close(g.double(), e)


def test_tile_of_one_row():
    a, b = _pairs(10, 4)
    scale = torch.tensor(5.0, requires_grad=True)
    dense = _loss_and_grads(info_nce_dense, a, b, scale)
    tiled = _loss_and_grads(lambda a, b, s: info_nce_tiled(a, b, s, tile_size=1), a, b, scale)
    for got, want in zip(tiled, dense):
        _assert_rel_close(got, want)


def test_tiled_gradcheck():
    a, b = _pairs(13, 5, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: info_nce_tiled(a, b, s, tile_size=4), (a, b, scale))


def test_hand_checked_two_pairs():
    """a = b = (e1, e2): L = s I, each of the four cross-entropies is log(1 + exp(-s)). In float64:
    in fp32, lse - L_ii cancels to an absolute error of about 1e-6 (one ulp of 10)."""
    eye = torch.eye(2, dtype=torch.float64)
    for scale in (1.0, 10.0, 100.0):
        expected = math.log1p(math.exp(-scale))
        for loss in (info_nce_dense(eye, eye, scale), info_nce_tiled(eye, eye, scale, tile_size=1)):
            assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-30)


def test_symmetric_and_order_invariant():
    """Swapping the two sides, or reordering the pairs, leaves the loss unchanged."""
    a, b = _pairs()
    perm = torch.randperm(NUM, generator=torch.Generator().manual_seed(1))
    base = info_nce_tiled(a, b, 14.0, tile_size=64)
    torch.testing.assert_close(info_nce_tiled(b, a, 14.0, tile_size=64), base)
    torch.testing.assert_close(info_nce_tiled(a[perm], b[perm], 14.0, tile_size=64), base)


def _load_open_clip_loss():
    """open_clip's ``ClipLoss`` from ``open_clip/loss.py`` alone: that file needs only torch, while
    importing the ``open_clip`` package needs torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("open_clip_torch is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ClipLoss


@pytest.mark.parametrize("form", ["dense", "tiled"])
def test_matches_open_clip(form):
    clip_loss = _load_open_clip_loss()()
    a, b = _pairs()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    ours_fn = info_nce_dense if form == "dense" else (lambda a, b, s: info_nce_tiled(a, b, s, tile_size=128))
    peer = _loss_and_grads(clip_loss, a, b, scale)
    ours = _loss_and_grads(ours_fn, a, b, scale)
    for got, want in zip(ours, peer):
        _assert_rel_close(got, want)


@pytest.mark.parametrize("form", ["dense", "tiled"])
def test_shards_add_up_to_the_whole_batch(form):
    """Three 'processes' holding rows [0, 50), [50, 170), [170, 300) against the gathered batch:
    their losses weighted by n / N sum to the whole-batch loss, with the same gradients, which
    reach every row both directly and through the gathered tensors."""
    a, b = _pairs()
    scale = torch.tensor(20.0, requires_grad=True)
    bounds = [(0, 50), (50, 170), (170, NUM)]

    def sharded(a, b, s):
        total = 0.0
        for r0, r1 in bounds:
            kwargs = {"a_all": a, "b_all": b, "row_offset": r0}
            if form == "tiled":
                part = info_nce_tiled(a[r0:r1], b[r0:r1], s, tile_size=32, **kwargs)
            else:
                part = info_nce_dense(a[r0:r1], b[r0:r1], s, **kwargs)
            total = total + part * (r1 - r0) / NUM
        return total

    whole = _loss_and_grads(info_nce_dense, a, b, scale)
    for got, want in zip(_loss_and_grads(sharded, a, b, scale), whole):
        _assert_rel_close(got, want)


def test_one_shard_with_detached_gather():
    """A process whose gathered tensors carry no gradient (gather without grad) still gets the
    same loss, and the dense and tiled forms agree on its local gradients."""
    a, b = _pairs()
    r0, r1 = 100, 180
    a_all, b_all = a.detach(), b.detach()
    local_a, local_b = a.detach()[r0:r1].requires_grad_(), b.detach()[r0:r1].requires_grad_()
    kwargs = {"a_all": a_all, "b_all": b_all, "row_offset": r0}
    dense = _loss_and_grads(lambda x, y, s: info_nce_dense(x, y, s, **kwargs), local_a, local_b, 14.0)
    tiled = _loss_and_grads(lambda x, y, s: info_nce_tiled(x, y, s, tile_size=48, **kwargs), local_a, local_b, 14.0)
    for got, want in zip(tiled[:3], dense[:3]):
        _assert_rel_close(got, want)


def test_auto_selects_tiled_above_threshold():
    a, b = _pairs()
    small = info_nce(a, b, 14.0, tiled_above=NUM)
    large = info_nce(a, b, 14.0, tiled_above=NUM - 1)
    forced = info_nce(a, b, 14.0, tile_size=64)
    assert "Tiled" not in type(small.grad_fn).__name__
    assert "Tiled" in type(large.grad_fn).__name__ and "Tiled" in type(forced.grad_fn).__name__
    assert "Tiled" not in type(info_nce(a, b, 14.0, tiled_above=None).grad_fn).__name__
    _assert_rel_close(large, small)
    _assert_rel_close(forced, small)
    assert DEFAULT_TILE_SIZE >= 1


def _peak_tensor_bytes(fn) -> int:
    """Peak of live tensor bytes allocated while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_tiled_never_holds_the_logits():
    """Forward + backward at N = 1024, tile 128: the tiled form's peak stays far below one N x N
    fp32 matrix (4 MiB), which the dense form exceeds."""
    num, tile = 1024, 128
    a, b = _pairs(num, 16)
    scale = torch.tensor(14.0, requires_grad=True)
    logits_bytes = num * num * 4
    dense_peak = _peak_tensor_bytes(lambda: info_nce_dense(a, b, scale).backward())
    tiled_peak = _peak_tensor_bytes(lambda: info_nce_tiled(a, b, scale, tile_size=tile).backward())
    assert dense_peak > logits_bytes
    assert tiled_peak < logits_bytes / 8, (tiled_peak, logits_bytes)


def test_low_precision_inputs_compute_in_fp32():
    a, b = _pairs()
    a16, b16 = a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    for loss_fn in (info_nce_dense, lambda a, b, s: info_nce_tiled(a, b, s, tile_size=64)):
        loss = loss_fn(a16, b16, 14.0)
        assert loss.dtype == torch.float32
        grad_a, grad_b = torch.autograd.grad(loss, (a16, b16))
        assert grad_a.dtype == grad_b.dtype == torch.bfloat16
        exact = info_nce_dense(a16.detach().float(), b16.detach().float(), 14.0)
        torch.testing.assert_close(loss, exact, rtol=1e-5, atol=0)


def test_rejects_bad_inputs():
    a, b = _pairs(8, 4)
    with pytest.raises(ValueError):
        info_nce_tiled(a, b[:7], 1.0)
    with pytest.raises(ValueError):
        info_nce_tiled(a, b, 1.0, tile_size=0)
    with pytest.raises(ValueError):
        info_nce_dense(a, b, 1.0, a_all=a)  # b_all missing
    with pytest.raises(ValueError):
        info_nce_dense(a[:4], b[:4], 1.0, a_all=a, b_all=b, row_offset=5)  # rows [5, 9) past 8
    with pytest.raises(ValueError):
        info_nce_dense(a, b, 1.0, row_offset=1)  # an offset needs the gathered batch
    with pytest.raises(ValueError):
        info_nce_dense(a, b, torch.ones(2))


def test_logit_scale_init_clamp_and_gradient():
    module = LogitScale()
    assert module().item() == pytest.approx(1 / 0.07, rel=1e-6)
    (grad,) = torch.autograd.grad(module(), module.log_scale)
    assert grad.item() == pytest.approx(1 / 0.07, rel=1e-6)  # d exp(x) / dx = exp(x) below the cap
    with torch.no_grad():
        module.log_scale.fill_(math.log(500.0))
    assert module().item() == pytest.approx(100.0)
    (grad,) = torch.autograd.grad(module(), module.log_scale)
    assert grad.item() == 0.0  # clamped: CLIP's scale stays at the cap


def test_logit_scale_settings_meta_and_dtype():
    module = LogitScale(init_scale=10.0, max_scale=50.0)
    assert module().item() == pytest.approx(10.0, rel=1e-6)
    assert module.bfloat16()().dtype == torch.float32  # fp32 island
    with torch.device("meta"):
        meta = LogitScale()
    assert meta.log_scale.is_meta
    restored = LogitScale()
    restored.load_state_dict(LogitScale(init_scale=3.0).state_dict())
    assert restored().item() == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError):
        LogitScale(init_scale=200.0, max_scale=100.0)
    with pytest.raises(ValueError):
        LogitScale(init_scale=0.0)
