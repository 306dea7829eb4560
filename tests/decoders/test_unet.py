"""The flow heads' U-Net velocity network: the DiT's call and shapes, padded condition tokens read
as absent (against the network given only the real ones), the condition reaching the output only
through cross-attention, and a tiny U-Net learning a two-class conditional flow whose exact field
is known (``flow_oracles``); inside the image head it trains a step and is chosen by config."""

from __future__ import annotations

import copy

import pytest
import torch
from batches import SHAPES, make_batch
from flow_oracles import nearest
from torch import nn

from polymodal.config import load_config
from polymodal.decoders.flow_networks import FLOW_NETWORKS, network_spec
from polymodal.decoders.flow_sampling import guided, integrate
from polymodal.decoders.unet import FlowUNet, MapNorm
from polymodal.errors import ConfigError
from polymodal.layers.cross_attention import CrossAttention
from polymodal.losses.flow_matching import flow_matching_loss, interpolate, target_velocity
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.training.compile import compiled_blocks

TINY = {"channels": 8, "channel_mults": (1, 2), "num_heads": 2}


def _tiny(dim_in: int = 3, layout: tuple[int, int] = (4, 8), dim_context: int | None = 6, **settings) -> FlowUNet:
    torch.manual_seed(0)
    return FlowUNet(dim_in, layout, dim_context, **(TINY | settings))


def _wake(network: nn.Module) -> nn.Module:
    """Every weight N(0, 0.3): the near-zero starts would hide what reaches the output."""
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.3)
    return network


def test_the_unet_takes_the_dits_call_and_returns_its_shape():
    tokens, t, context = torch.randn(2, 32, 3), torch.rand(2), torch.randn(2, 5, 6)
    for name in ("dit", "unet"):
        network = FLOW_NETWORKS.build(network_spec({"name": name}), 3, (4, 8), 6)
        assert network(tokens, t, context=context).shape == (2, 32, 3)
    three_levels = _tiny(layout=(8, 16), channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=3)
    assert three_levels(torch.randn(2, 128, 3), t, context=context).shape == (2, 128, 3)
    assert network_spec({})["name"] == "dit"  # a decoder mapping without a name is the DiT, as before


def test_a_padded_condition_token_reads_as_absent():
    network = _wake(_tiny()).double()
    tokens, t = torch.randn(3, 32, 3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    real = torch.randn(3, 4, 6, dtype=torch.float64)
    padded = torch.cat([real, 50 * torch.randn(3, 2, 6, dtype=torch.float64)], dim=1)  # (3, 6, 6): two padded tokens
    mask = torch.tensor([[True] * 4 + [False] * 2] * 3)
    torch.testing.assert_close(network(tokens, t, context=padded, context_mask=mask), network(tokens, t, context=real))
    unmasked = network(tokens, t, context=padded)
    assert (unmasked - network(tokens, t, context=real)).abs().max() > 1e-3  # the padding would matter if read


def test_with_cross_attention_silenced_the_condition_reaches_nothing():
    network = _wake(_tiny())
    tokens, t = torch.randn(2, 32, 3), torch.rand(2)
    first, second = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    assert (network(tokens, t, context=first) - network(tokens, t, context=second)).abs().max() > 1e-3
    readers = [m for m in network.modules() if isinstance(m, CrossAttention)]
    assert len(readers) == 2 + 2 + 1  # attention_levels 2 of 2 levels: 1 down + 1 up block each, and the middle
    with torch.no_grad():
        for reader in readers:
            reader.o_proj.weight.zero_()
    torch.testing.assert_close(network(tokens, t, context=first), network(tokens, t, context=second), rtol=0, atol=0)


def test_only_the_coarse_levels_read_the_condition():
    network = _tiny(layout=(8, 16), channel_mults=(1, 2, 2), attention_levels=1)
    read_at = {m.positions.shape[0] for m in network.modules() if hasattr(m, "attn") and isinstance(m.attn, CrossAttention)}
    assert read_at == {2 * 4}  # the 2 x 4 level only (the middle sits there too)
    assert not any(isinstance(m, CrossAttention) for m in _tiny(dim_context=None).modules())


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="does not halve 2 times"):
        FlowUNet(1, (6, 8), 4, channels=8, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="not a sequence"):
        FlowUNet(1, 12, 4, channels=8)
    with pytest.raises(ValueError, match="must divide by 8"):
        FlowUNet(1, (4, 8), 4, channels=12)
    with pytest.raises(ValueError, match="give context exactly when"):
        _tiny()(torch.randn(1, 32, 3), torch.rand(1))


def test_the_head_chooses_the_unet_by_config_and_trains_a_step():
    head = "{name: flow_matching, patch_size: 2, num_queries: 4, dim_condition: 32, decoder: {name: unet, channels: 8, channel_mults: [1, 2, 2]}}"
    config = load_config(["tiny"], ["model.tasks=[text_to_image]", f"model.heads.image={head}"])
    torch.manual_seed(0)
    model = build_model(config, SHAPES)
    assert isinstance(model.head(Modality.IMAGE).flow.network, FlowUNet)
    before = {k: v.clone() for k, v in model.head(Modality.IMAGE).flow.network.state_dict().items()}
    loss = model(make_batch()).losses["text_to_image_flow_matching"]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = model.head(Modality.IMAGE).flow.network.state_dict()
    assert torch.isfinite(loss) and any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match=r"model.heads.image.decoder.conv_kernel: unknown setting of flow decoder 'unet'"):
        load_config(["tiny"], ["model.tasks=[text_to_image]", "model.heads.image={name: flow_matching, decoder: {name: unet, conv_kernel: 3}}"])


@pytest.mark.slow
def test_a_tiny_unet_learns_a_two_class_conditional_flow():
    # Two images (ink in the left or the right half of a 4 x 8 map), spread 0.05; the class is
    # told only by one of two condition tokens, read through cross-attention.
    means = torch.full((2, 1, 4, 8), -1.0)
    means[0, :, :, :4], means[1, :, :, 4:] = 1.0, 1.0
    spread, classes = 0.05, torch.randn(2, 1, 6)
    network = _tiny(dim_in=1, attention_levels=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        label = torch.randint(2, (32,), generator=g)
        data = means[label] + spread * torch.randn(32, 1, 4, 8, generator=g)
        noise, t = torch.randn(data.shape, generator=g), torch.rand(32, generator=g)
        velocity = network(interpolate(noise, data, t).flatten(2).transpose(1, 2), t, context=classes[label])
        loss = flow_matching_loss(velocity, target_velocity(noise, data).flatten(2).transpose(1, 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    label = torch.arange(2).repeat(16)  # (32,)
    field = guided(lambda x, t, c: network(x, t, context=c), classes[label], None, 1.0)
    with torch.no_grad():
        drawn = integrate(field, torch.randn(32, 32, 1, generator=g), steps=10, sampler="heun")  # (32, h w, 1) row-major
    which, distance = nearest(drawn.transpose(1, 2).reshape(32, 1, 4, 8), means)
    assert (which == label).float().mean() >= 0.9  # each sample is the class it was asked for
    assert distance.median() < 0.3  # and near that image, not a blend (the means are 2 apart per value)


def test_the_map_norm_is_groupnorm_computed_wide_and_returned_in_the_maps_precision():
    torch.manual_seed(0)
    ours, plain = MapNorm(2, 6), nn.GroupNorm(2, 6)
    with torch.no_grad():
        for p in (*ours.parameters(), *plain.parameters()):
            p.copy_(torch.linspace(-1.0, 2.0, 6))
    maps = torch.randn(3, 6, 4, 5).contiguous(memory_format=torch.channels_last)  # as the U-Net's maps are
    torch.testing.assert_close(ours(maps), plain(maps))
    assert ours(maps.double()).dtype == torch.float64
    torch.testing.assert_close(ours(maps.double()), copy.deepcopy(plain).double()(maps.double()))
    low = maps.bfloat16()
    out = ours(low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain(low.float()).bfloat16())  # the fp32 norm of the bf16 map, rounded once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(low).dtype == torch.bfloat16


@pytest.mark.slow  # Inductor compiles six blocks: about 40 s on 2 cores
def test_compiled_residual_blocks_compute_what_the_eager_ones_do():
    """train.compile compiles the U-Net's residual blocks (``compile_unit``): outputs and every
    gradient match the eager network's, and the blocks run eagerly again after."""
    network = _wake(_tiny())
    tokens, t, context = torch.randn(2, 32, 3), torch.rand(2), torch.randn(2, 5, 6)

    def step() -> list[torch.Tensor]:
        network.zero_grad()
        out = network(tokens, t, context=context)
        out.square().mean().backward()
        return [out.detach(), *(p.grad.clone() for p in network.parameters())]

    eager = step()
    torch._dynamo.reset()
    with compiled_blocks(network) as count:
        assert count == 6  # a residual block per level down (2) and up (2), two in the middle
        compiled = step()
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in network.modules())
