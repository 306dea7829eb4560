"""RMSNorm against torch.nn.RMSNorm and a float64 formula; SwiGLU / GELU MLP against explicit maths."""

from __future__ import annotations

import pytest
import torch

from polymodal.layers.mlp import GeluMLP, SwiGLU, swiglu_hidden_dim
from polymodal.layers.norms import RMSNorm


def _reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def test_rms_norm_matches_torch_and_float64_reference():
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    peer = torch.nn.RMSNorm(48, eps=1e-5)
    peer.load_state_dict(norm.state_dict())
    x = torch.randn(3, 7, 48) * 5 + 1
    out = norm(x)
    torch.testing.assert_close(out, peer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), _reference_rms_norm(x, norm.weight, 1e-5), rtol=1e-5, atol=1e-5)


def test_rms_norm_keeps_input_dtype_and_is_scale_invariant():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    x = torch.randn(4, 32)
    out_bf16 = norm(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), norm(x), rtol=2e-2, atol=2e-2)
    # RMS normalisation removes any positive per-token scale.
    torch.testing.assert_close(norm(x * 1000.0), norm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("dim", "ratio", "expected"), [(256, 4.0, 688), (512, 4.0, 1368), (64, 4.0, 176)])
def test_swiglu_hidden_dim_matches_gelu_parameter_count(dim, ratio, expected):
    hidden = swiglu_hidden_dim(dim, ratio)
    assert hidden == expected
    assert hidden % 8 == 0
    swiglu_params = 3 * dim * hidden
    gelu_params = 2 * dim * int(ratio * dim)
    assert abs(swiglu_params - gelu_params) <= 3 * dim * 8  # equal up to the rounding to 8


def test_swiglu_matches_explicit_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24, bias=True).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    w_gate, w_up = mlp.gate_up_proj.weight[:24], mlp.gate_up_proj.weight[24:]
    b_gate, b_up = mlp.gate_up_proj.bias[:24], mlp.gate_up_proj.bias[24:]
    gate = x @ w_gate.T + b_gate
    up = x @ w_up.T + b_up
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), expected)


def test_gelu_mlp_matches_explicit_formula_and_dim_out():
    torch.manual_seed(0)
    mlp = GeluMLP(8, 32, 5).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
    expected = gelu @ mlp.fc2.weight.T + mlp.fc2.bias
    out = mlp(x)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, expected)


def test_init_weights_scales():
    torch.manual_seed(0)
    mlp = SwiGLU(256, 688, bias=True)
    mlp.init_weights(std=0.02, out_std=0.005)
    assert abs(mlp.gate_up_proj.weight.std().item() - 0.02) < 0.002  # truncation at 3 std barely narrows it
    assert abs(mlp.down_proj.weight.std().item() - 0.005) < 0.0005
    assert mlp.gate_up_proj.bias.abs().max() == 0
