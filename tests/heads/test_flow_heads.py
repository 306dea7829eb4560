"""The flow-matching image heads and the MAS text -> audio head inside a small any-to-any model:
the loss falls when a batch is fitted, sampling is the integration of the head's own velocity,
seeded samples repeat and differ across seeds, MAS recovers durations known by construction and,
with references, is MAS on the reference speech (whose timings it only compares with its own). The
image head's patch tokens are row-major patches, back to the same pixels, in the order of the DiT's
2-D positions, and under the exact velocity of two images its samples are those images."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from batches import SHAPES, Fixed, make_batch
from einops import rearrange
from flow_oracles import mixture_velocity, nearest
from torch import nn

from polymodal.config import load_config
from polymodal.data.batch import AlignedTargets, Batch
from polymodal.decoders.flow_sampling import integrate
from polymodal.errors import ConfigError
from polymodal.heads import Targets, generation_options
from polymodal.heads.aligned_mel import SILENCE, mel_targets
from polymodal.layers.positional import sincos_2d_embedding
from polymodal.losses.flow_matching import flow_matching_loss, interpolate, target_velocity, training_times
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

IMAGE_HEAD = "{name: flow_matching, patch_size: 8, num_queries: 4, dim_condition: 32, decoder: {dim: 96, num_layers: 1, num_heads: 2}}"


def _model(task: str, head: str, *extra: str):
    target = task.split("_to_")[1]
    config = load_config(["tiny"], [f"model.tasks=[{task}]", f"model.heads.{target}={head}", *extra])
    torch.manual_seed(0)
    return build_model(config, SHAPES)


def _text(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]


@pytest.mark.slow
def test_the_image_head_fits_a_batch():
    model = _model("text_to_image", IMAGE_HEAD)
    batch = make_batch()
    # Each item's image one grey level (random pixels would leave the flow a large irreducible loss).
    batch.inputs[Modality.IMAGE] = torch.linspace(-0.9, 0.9, 4)[:, None, None, None].expand(4, 1, 32, 96).clone()

    def loss_on_fixed_draws() -> float:
        """The loss averaged over 8 seeded draws of (t, noise), the same draws each time it is asked:
        a running training loss moves as much with its draws as with the weights."""
        model.eval()
        with torch.no_grad():
            values = []
            for seed in range(8):
                torch.manual_seed(100 + seed)
                values.append(model(batch).losses["text_to_image_flow_matching"].item())
        model.train()
        return sum(values) / len(values)

    before = loss_on_fixed_draws()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    for _ in range(80):
        optimizer.zero_grad()
        model(batch).losses["text_to_image_flow_matching"].backward()
        optimizer.step()
    assert loss_on_fixed_draws() < 0.8 * before  # 0.68x on a 2-core EPYC


def test_sampling_integrates_the_heads_velocity_with_guidance():
    model = _model("text_to_image", IMAGE_HEAD).eval()
    head = model.head(Modality.IMAGE)
    ids, mask = _text(make_batch())
    source, valid = model.encode(Modality.TEXT, ids, mask)
    made = model.generate(Modality.TEXT, Modality.IMAGE, ids, mask, steps=3, sampler="euler", guidance=2.5, generator=torch.Generator().manual_seed(3))
    flow = head.flow
    with torch.no_grad():
        condition, empty = flow.queries(model, source, valid).condition, flow.queries.empty(model, source).condition
        noise = torch.randn((len(ids), *flow.shape), generator=torch.Generator().manual_seed(3))

        def velocity(x, t):  # classifier-free guidance written out with two calls
            unconditional = flow.velocity(x, t, empty.expand_as(condition))
            return unconditional + 2.5 * (flow.velocity(x, t, condition) - unconditional)

        expected = integrate(velocity, noise, steps=3, sampler="euler").clamp(-1, 1)
    torch.testing.assert_close(made, expected, rtol=1e-4, atol=1e-4)


def _patches_by_loop(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C p p): patch (r, c) is token r * W/p + c, written out."""
    rows, cols = images.shape[2] // p, images.shape[3] // p
    return torch.stack([images[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(len(images), -1) for r in range(rows) for c in range(cols)], dim=1)


class _TokenSpy(nn.Module):
    """Stands in for the DiT: keeps the tokens it is given and answers ``answer(tokens, t)``."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer, self.seen = answer, None

    def forward(self, tokens, t, *, context=None, context_mask=None):
        self.seen, self.context, self.context_mask = tokens, context, context_mask
        return self.answer(tokens, t)


@pytest.mark.parametrize("sample_shift", [None, 2.0])
def test_the_time_settings_reach_the_training_times_and_the_sampling_grid(sample_shift):
    # The head's loss and samples written out with the shifted logit-normal times and the grid's own
    # shift: uniform unless sample_shift is set, whatever the training times' shift.
    grid = "" if sample_shift is None else f", sample_shift: {sample_shift}"
    shifted = IMAGE_HEAD[:-1] + f", time_distribution: logit_normal, time_shift: 3.0, condition_dropout: 0.0{grid}}}"
    model = _model("text_to_image", shifted)
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = model.encode(Modality.TEXT, *_text(batch))
    images = batch.inputs[Modality.IMAGE]
    torch.manual_seed(5)
    _, loss = flow.loss(model, source, valid, images)
    torch.manual_seed(5)
    condition = flow.queries(model, source, valid).condition
    noise = torch.randn_like(images)
    t = training_times(len(images), distribution="logit_normal", shift=3.0)
    expected = flow_matching_loss(flow.velocity(interpolate(noise, images, t), t, condition), target_velocity(noise, images))
    torch.testing.assert_close(loss, expected)
    model.eval()
    flow.network = _TokenSpy(lambda tokens, t: tokens + t[:, None, None])  # a field that depends on t
    made = model.generate(Modality.TEXT, Modality.IMAGE, *_text(batch), steps=3, sampler="euler", guidance=1.0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        condition = flow.queries(model, source, valid).condition
        start = torch.randn((len(images), *flow.shape), generator=torch.Generator().manual_seed(3))
        velocity = lambda x, t: flow.velocity(x, t, condition)  # noqa: E731
        expected = integrate(velocity, start, steps=3, sampler="euler", shift=sample_shift or 1.0).clamp(-1, 1)
        torch.testing.assert_close(made, expected)
        other = integrate(velocity, start, steps=3, sampler="euler", shift=3.0 if sample_shift is None else 1.0).clamp(-1, 1)
        assert not torch.allclose(made, other, atol=1e-3)


def test_patch_tokens_are_row_major_round_trip_and_match_the_positions():
    flow = _model("text_to_image", IMAGE_HEAD).head(Modality.IMAGE).flow
    assert flow.grid == (4, 12)  # 32 x 96 at patch 8: 4 rows of 12
    torch.testing.assert_close(flow.network.positions, sincos_2d_embedding(4, 12, 96))  # token r * 12 + c at (r, c)
    images = torch.randn(2, 1, 32, 96)
    flow.network = _TokenSpy(lambda tokens, t: tokens)
    with torch.no_grad():
        torch.testing.assert_close(flow.velocity(images, torch.rand(2), torch.zeros(2, 4, 32)), images)  # back to the same pixels
    torch.testing.assert_close(flow.network.seen, _patches_by_loop(images, 8))
    # Unpatchifying on its own: token k's values fill patch (k // 12, k % 12).
    flow.network = _TokenSpy(lambda tokens, t: torch.arange(48.0)[None, :, None].expand_as(tokens))
    with torch.no_grad():
        filled = flow.velocity(images, torch.rand(2), torch.zeros(2, 4, 32))
    for r, c in ((0, 0), (0, 11), (3, 0), (2, 5)):
        assert torch.all(filled[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] == r * 12 + c)


def test_under_the_exact_velocity_of_two_images_the_head_draws_them():
    # The head's sampling (noise, patch tokens, time convention, integration, clamp) with its DiT
    # replaced by the exact field of two images (a narrow Gaussian around each), written in tokens.
    model = _model("text_to_image", IMAGE_HEAD).eval()
    images = torch.full((2, 1, 32, 96), -0.8)
    images[0, :, 4:20, 10:40] = 0.8  # a block at the top left
    images[1, :, 12:30, 50:90] = 0.6  # another at the bottom right
    exact = mixture_velocity(_patches_by_loop(images, 8), torch.tensor([0.5, 0.5]), 0.02)
    model.head(Modality.IMAGE).flow.network = _TokenSpy(exact)
    drawn = model.generate(Modality.TEXT, Modality.IMAGE, *_text(make_batch()), steps=16, sampler="heun", generator=torch.Generator().manual_seed(0))
    _, distance = nearest(drawn, images)
    assert distance.max() < 0.05  # per pixel (RMS), against 0.93 between the two images


def test_seeded_samples_repeat_and_seeds_differ():
    model = _model("text_to_image", IMAGE_HEAD).eval()
    ids, mask = _text(make_batch())
    draw = lambda seed: model.generate(Modality.TEXT, Modality.IMAGE, ids, mask, steps=2, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.allclose(draw(0), draw(1))
    assert generation_options(model.head(Modality.IMAGE), generator=None, temperature=0.0) == {"generator": None}


def _read_source_head(decoder: str, **settings: str) -> str:
    head = IMAGE_HEAD[:-1].replace("decoder: {dim: 96, num_layers: 1, num_heads: 2}", f"decoder: {decoder}")
    return head + ", read_source: true" + "".join(f", {k}: {v}" for k, v in settings.items()) + "}"


UNET = "{name: unet, channels: 8, channel_mults: [1, 2], num_heads: 2}"
DIT = "{dim: 96, num_layers: 1, num_heads: 2}"


def _woken(network: nn.Module) -> nn.Module:
    """Every weight N(0, 0.1): the near-zero starts would hide what reaches the output."""
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return network


@pytest.mark.parametrize("decoder", [DIT, UNET])
def test_padding_the_source_changes_no_loss(decoder):
    # Same noise, t and dropped items (half of them, so both paths run): extra masked source tokens
    # change nothing, in either velocity network.
    model = _model("text_to_image", _read_source_head(decoder, condition_dropout=0.5))
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    _woken(flow.network)
    source, valid = model.encode(Modality.TEXT, *_text(batch))
    extra = 10.0 * torch.randn(len(source), 3, source.shape[-1])
    padded, padded_valid = torch.cat([source, extra], dim=1), torch.cat([valid, valid.new_zeros(len(valid), 3)], dim=1)
    losses = []
    for seed in (5, 6):
        for s, m in ((source, valid), (padded, padded_valid)):
            torch.manual_seed(seed)
            losses.append(flow.loss(model, s, m, batch.inputs[Modality.IMAGE])[1])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[3], losses[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(losses[0], losses[2])  # other draws, another loss: the comparison can fail


def test_a_dropped_item_is_exactly_the_empty_condition():
    model = _model("text_to_image", _read_source_head(UNET, condition_dropout=0.5))
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = model.encode(Modality.TEXT, *_text(batch))
    made, empty = flow.queries(model, source, valid), flow.queries.empty(model, source, num_source=source.shape[1])
    network, flow.network = flow.network, _TokenSpy(lambda tokens, t: torch.zeros_like(tokens))
    torch.manual_seed(2)
    flow.loss(model, source, valid, batch.inputs[Modality.IMAGE])
    kinds = []
    for i in range(len(source)):
        context, mask = flow.network.context[i], flow.network.context_mask[i]
        if torch.equal(context, empty.condition[0]) and torch.equal(mask, empty.mask[0]):
            kinds.append("dropped")
        else:
            assert torch.equal(mask, made.mask[i])
            torch.testing.assert_close(context, made.condition[i])
            kinds.append("kept")
    assert set(kinds) == {"dropped", "kept"}
    # The padded empty condition draws as the bare one (the queries over no source, no padding).
    bare, x, t = flow.queries.empty(model, source), torch.randn(1, *flow.shape), torch.rand(1)
    for net in (network, _model("text_to_image", _read_source_head(DIT)).head(Modality.IMAGE).flow.network):
        flow.network = _woken(net)
        with torch.no_grad():
            torch.testing.assert_close(flow.velocity(x, t, empty.condition, empty.mask), flow.velocity(x, t, bare.condition), rtol=1e-5, atol=1e-6)


def test_with_read_source_off_the_loss_is_the_queries_alone_bitwise():
    # The loss written out as before the setting: the queries' condition, no mask.
    model = _model("text_to_image", IMAGE_HEAD[:-1] + ", condition_dropout: 0.5, noise_draws: 2}")
    flow, batch = model.head(Modality.IMAGE).flow, make_batch()
    source, valid = model.encode(Modality.TEXT, *_text(batch))
    images = batch.inputs[Modality.IMAGE]
    torch.manual_seed(5)
    loss = flow.loss(model, source, valid, images)[1]
    torch.manual_seed(5)
    condition = flow.queries.connector(flow.queries._pass(model, source, valid)[:, source.shape[1] :])
    dropped = torch.rand(len(images)) < 0.5
    empty = flow.queries.connector(flow.queries._pass(model, source[:, :0], valid[:, :0]))
    condition = torch.where(dropped[:, None, None], empty, condition).repeat_interleave(2, dim=0)
    data = images.repeat_interleave(2, dim=0)
    noise, t = torch.randn_like(data), training_times(len(data))
    tokens = rearrange(interpolate(noise, data, t), "b c (h p) (w q) -> b (h w) (c p q)", p=8, q=8)
    velocity = rearrange(flow.network(tokens, t, context=condition), "b (h w) (c p q) -> b c (h p) (w q)", h=4, p=8, q=8)
    assert torch.equal(loss, flow_matching_loss(velocity, target_velocity(noise, data)))


LATENT_VAE = "model.image_tokenizer={name: vae, channels: 16, num_downsamples: 2, num_res_blocks: 1, dim: 4}"
LATENT_HEAD = "{name: flow_matching_latent, patch_size: 2, num_queries: 4, dim_condition: 32, decoder: {dim: 32, num_layers: 1, num_heads: 2}}"


def test_the_latent_head_flows_in_the_vaes_latent_space():
    model = _model("text_to_image", LATENT_HEAD, LATENT_VAE)
    assert model.image_tokenizer is not None and model.head(Modality.IMAGE).flow.shape == (4, 8, 24)
    losses = model(make_batch()).losses
    assert torch.isfinite(losses["text_to_image_flow_matching"])
    images = model.eval().generate(Modality.TEXT, Modality.IMAGE, *_text(make_batch()), steps=2)
    assert images.shape == (4, 1, 32, 96) and images.abs().max() <= 1.0


def test_the_latent_head_measures_its_scale_on_the_first_batch_and_keeps_it():
    model = _model("text_to_image", LATENT_HEAD[:-1] + ", condition_dropout: 0.0}", LATENT_VAE)
    head, batch = model.head(Modality.IMAGE), make_batch()
    source, valid = model.encode(Modality.TEXT, *_text(batch))
    images = batch.inputs[Modality.IMAGE]
    with pytest.raises(RuntimeError, match="latent_scale is not set"):
        head.eval().generate(model, source, valid, steps=1)
    head.train()
    latents = model.image_tokenizer.encode(images)  # (B, 4, 8, 24)
    spread = latents.double().sub(latents.double().mean()).square().sum().div(latents.numel() - 1).sqrt()  # std written out
    torch.manual_seed(5)
    loss = head.loss(model, source, valid, Targets(images, None)).losses["flow_matching"]
    torch.testing.assert_close(head.latent_scale.double(), spread, rtol=1e-6, atol=0)
    # The loss is the flow's loss on the latents divided by that scale, written out.
    torch.manual_seed(5)
    condition = head.flow.queries(model, source, valid).condition
    data = latents / spread.float()
    noise = torch.randn_like(data)
    t = training_times(len(data))
    expected = flow_matching_loss(head.flow.velocity(interpolate(noise, data, t), t, condition), target_velocity(noise, data))
    torch.testing.assert_close(loss, expected)
    # Measured once: a second batch of other images leaves it, and it travels with the weights.
    head.loss(model, source, valid, Targets(images.flip(-1) * 0.5, None))
    torch.testing.assert_close(head.latent_scale.double(), spread, rtol=1e-6, atol=0)
    fresh = _model("text_to_image", LATENT_HEAD, LATENT_VAE)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.head(Modality.IMAGE).latent_scale, head.latent_scale)


def test_the_latent_head_decodes_its_samples_times_the_scale():
    model = _model("text_to_image", LATENT_HEAD[:-1] + ", latent_scale: 2.5}", LATENT_VAE).eval()
    head, batch = model.head(Modality.IMAGE), make_batch()
    source, valid = model.encode(Modality.TEXT, *_text(batch))
    made = head.generate(model, source, valid, steps=2, generator=torch.Generator().manual_seed(3))
    latents = head.flow.sample(model, source, valid, steps=2, sampler=None, guidance=None, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(made, model.image_tokenizer.decode(latents * 2.5).clamp(-1, 1))
    assert not torch.allclose(made, model.image_tokenizer.decode(latents).clamp(-1, 1), atol=1e-3)
    with pytest.raises(ConfigError, match="latent_scale must be > 0"):
        load_config(["tiny"], ["model.tasks=[text_to_image]", LATENT_VAE, "model.heads.image=" + LATENT_HEAD[:-1] + ", latent_scale: 0.0}"])


def test_mas_recovers_durations_known_by_construction():
    model = _model("text_to_audio", "{name: mas_mel}")
    head = model.head(Modality.AUDIO)
    torch.manual_seed(0)
    durations = torch.tensor([[4, 9, 2, 6], [3, 3, 12, 0]])
    means = torch.randn(2, 4, SHAPES.num_mels) * 2
    frames = torch.stack([torch.cat([means[b, i].expand(int(d), -1) for i, d in enumerate(durations[b])] + [torch.zeros(21 - int(durations[b].sum()), SHAPES.num_mels)]) for b in range(2)])
    frames = frames + 0.05 * torch.randn_like(frames)
    token_mask = durations > 0
    frame_mask = torch.arange(21)[None, :] < durations.sum(1, keepdim=True)
    path = head.align(means, token_mask, frames, frame_mask)
    assert torch.equal(path.sum(-1).long(), durations)


def test_mas_with_states_per_token_finds_each_tokens_frames_over_its_states():
    """Reference speech made of 3 sounds per token, each sound's frames alike, the second token's
    sounds the first's in another order; the head's prior layer made to give each token those 3
    means in order. Its loss finds every token's duration (``duration_error`` 0); with one mean per
    token (the sounds' average, alike for the first two tokens) MAS misplaces frames."""
    k, durations = 3, torch.tensor([[2, 3, 1, 4, 2, 2, 3, 3, 1], [1, 1, 1, 5, 3, 2, 0, 0, 0]])  # per sound
    torch.manual_seed(0)
    sounds = torch.randn(2, 9, SHAPES.num_mels) * 2  # normalised units
    sounds[:, 3:6] = sounds[:, [1, 2, 0]]  # the second token says the first's sounds in another order
    frames = torch.zeros(2, 21, SHAPES.num_mels)
    for b in range(2):
        frames[b, : int(durations[b].sum())] = torch.repeat_interleave(sounds[b], durations[b], dim=0)
    frames = frames + 0.05 * torch.randn_like(frames)
    tokens = durations.view(2, 3, k).sum(-1).float()  # (2, 3) frames per token
    present = torch.ones(2, dtype=torch.bool)
    ids, token_mask = torch.tensor([[1, 5, 2], [1, 2, 0]]), tokens > 0
    log_mels, frame_mask = frames * SHAPES.log_mel_scale + SHAPES.log_mel_center, tokens.sum(1, keepdim=True) > torch.arange(21)
    speech = AlignedTargets(ids, token_mask, tokens, log_mels, frame_mask, present)
    batch = Batch({Modality.TEXT: ids}, {Modality.TEXT: token_mask}, {m: present for m in Modality}, torch.tensor([0, 1]), {Modality.AUDIO: speech})

    def error(states_per_token: int, means: torch.Tensor) -> float:
        head = f"{{name: mas_mel, references: true, states_per_token: {states_per_token}, silent_edges: false}}"
        model = _model("text_to_audio", head)
        model.head(Modality.AUDIO).prior_head = Fixed(means)  # (B, Ns, k M) whatever the states
        return model(batch).metrics["text_to_audio_duration_error"]

    assert error(3, rearrange(sounds, "b (n k) m -> b n (k m)", k=k)) == 0.0
    assert error(1, sounds.view(2, 3, k, -1).mean(2)) > 0.5
    with pytest.raises(ValueError, match="states_per_token must be >= 1"):
        _model("text_to_audio", "{name: mas_mel, states_per_token: 0}")


def test_mas_silent_edges_give_bos_and_eos_the_silence_whatever_their_states_say():
    """Silence, two words of 2 sounds each, silence: with ``silent_edges`` [bos] and [eos] take
    exactly the silent frames, whatever the prior layer says for them; with learned means that
    match a word's sound, they take that word's frames."""
    torch.manual_seed(0)
    sounds = torch.randn(4, SHAPES.num_mels) * 2 + 3  # normalised units, far from silence
    silence = (SILENCE - SHAPES.log_mel_center) / SHAPES.log_mel_scale
    words = torch.repeat_interleave(sounds, torch.tensor([2, 4, 3, 2]), dim=0)
    frames = torch.cat([torch.full((3, SHAPES.num_mels), silence), words, torch.full((2, SHAPES.num_mels), silence)])[None]
    tokens = torch.tensor([[3.0, 6.0, 5.0, 2.0]])  # frames of [bos], word, word, [eos]
    ids, token_mask, present = torch.tensor([[1, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    log_mels = frames * SHAPES.log_mel_scale + SHAPES.log_mel_center
    speech = AlignedTargets(ids, token_mask, tokens, log_mels, torch.ones(1, 16, dtype=torch.bool), present)
    batch = Batch({Modality.TEXT: ids}, {Modality.TEXT: token_mask}, {m: present for m in Modality}, torch.tensor([0]), {Modality.AUDIO: speech})
    edge_says = sounds[[0, 1]]  # [bos] learned the first word's sounds, [eos] the second's
    means = torch.stack([edge_says, sounds[:2], sounds[2:], sounds[2:]])[None].flatten(2)  # (1, 4, 2 M)

    def error(silent_edges: bool) -> float:
        head = f"{{name: mas_mel, references: true, states_per_token: 2, silent_edges: {str(silent_edges).lower()}}}"
        model = _model("text_to_audio", head)
        model.head(Modality.AUDIO).prior_head = Fixed(means)
        return model(batch).metrics["text_to_audio_duration_error"]

    assert error(True) == 0.0
    assert error(False) > 0.0  # [bos] or [eos] takes frames of a word


def test_mas_alignment_prior_spreads_alike_tokens_and_is_checked():
    alike = torch.zeros(1, 4, SHAPES.num_mels)  # four tokens with one mean: the likelihood cannot tell them apart
    frames, tokens, steps = torch.randn(1, 20, SHAPES.num_mels), torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)
    plain = _model("text_to_audio", "{name: mas_mel, alignment_prior: 0.0}").head(Modality.AUDIO).align(alike, tokens, frames, steps).sum(-1)
    spread = _model("text_to_audio", "{name: mas_mel, alignment_prior: 1.0}").head(Modality.AUDIO).align(alike, tokens, frames, steps).sum(-1)
    assert plain.max() == 17 and spread.max() <= 6  # ties stay on one token; the prior shares the frames out
    with pytest.raises(ValueError, match="alignment_prior must be >= 0"):
        _model("text_to_audio", "{name: mas_mel, alignment_prior: -1.0}")


def test_mas_with_references_is_mas_on_the_reference_speech_and_compares_the_timings():
    batch = make_batch()
    speech = batch.references[Modality.AUDIO]
    model = _model("text_to_audio", "{name: mas_mel, references: true, states_per_token: 2}")
    head = model.head(Modality.AUDIO)
    assert head.reads_references and not _model("text_to_audio", "{name: mas_mel}").head(Modality.AUDIO).reads_references
    out = model(batch)
    # the same terms as the items' own speech would give, were the references the items' text and speech
    swapped = dataclasses.replace(
        batch,
        inputs={**batch.inputs, Modality.TEXT: speech.ids, Modality.AUDIO: speech.values},
        masks={**batch.masks, Modality.TEXT: speech.mask, Modality.AUDIO: speech.value_mask},
        references={},
    )
    own = _model("text_to_audio", "{name: mas_mel, states_per_token: 2}")
    for name, term in own(swapped).losses.items():
        torch.testing.assert_close(out.losses[name], term)
    # the metric: MAS's frames per token against the references' own timings, which it never reads
    source, valid = model.encode(Modality.TEXT, speech.ids, speech.mask)
    means, states, owner = head.state_means(model.source_states(source, valid), valid, head.edge_frame())
    frames = mel_targets(speech.values, speech.value_mask, speech.values.shape[1], head.center, head.scale)
    path = head.align(means, states, frames, speech.value_mask)
    found = torch.stack([(path * (owner[:, :, None] == i)).sum((1, 2)) for i in range(valid.shape[1])], 1)  # frames per token
    assert out.metrics["text_to_audio_duration_error"] == pytest.approx(float((found - speech.durations)[valid].abs().mean()))
    moved = dataclasses.replace(batch, references={Modality.AUDIO: dataclasses.replace(speech, durations=speech.durations + 1)})
    assert torch.equal(model(moved).losses["text_to_audio"], out.losses["text_to_audio"])  # the timings train nothing
    with pytest.raises(ConfigError, match="model.heads.audio: the mas_mel head learns from aligned references, which data.source=manifest"):
        on_manifest = ["data.source=manifest", "data.manifest=a.jsonl", "model.tasks=[text_to_audio]"]
        load_config(["tiny"], [*on_manifest, "model.heads.audio={name: mas_mel, references: true}"])


def test_mas_handles_clips_shorter_than_their_text(caplog):
    head = _model("text_to_audio", "{name: mas_mel}").head(Modality.AUDIO)
    means, frames = torch.randn(1, 5, SHAPES.num_mels), torch.randn(1, 3, SHAPES.num_mels)
    with caplog.at_level(logging.DEBUG, logger="polymodal.heads.state_alignment"):
        for _ in range(3):
            path = head.align(means, torch.ones(1, 5, dtype=torch.bool), frames, torch.ones(1, 3, dtype=torch.bool))
            assert torch.equal(path.sum(1), torch.ones(1, 3))  # every frame still belongs to one token
    levels = [record.levelno for record in caplog.records if "fewer frames" in record.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]  # warned once, then counted
    assert "(3 so far" in caplog.records[-1].getMessage()


def test_the_flow_mel_decoder_varies_with_its_noise():
    flow = "{name: mas_mel, decoder: flow, flow: {dim: 32, num_layers: 1, num_heads: 2}, steps: 2}"
    model = _model("text_to_audio", flow)
    losses = model(make_batch()).losses
    assert set(losses) == {"text_to_audio_flow_matching", "text_to_audio_duration", "text_to_audio_prior"}
    model.eval()
    ids, mask = _text(make_batch())
    draw = lambda seed: model.generate(Modality.TEXT, Modality.AUDIO, ids, mask, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first = draw(0)
    assert first.shape[0] == 4 and first.shape[2] == SHAPES.num_mels
    assert torch.equal(first, draw(0)) and not torch.allclose(first, draw(1))
    regression = _model("text_to_audio", "{name: mas_mel}").eval()
    assert torch.equal(regression.generate(Modality.TEXT, Modality.AUDIO, ids, mask), regression.generate(Modality.TEXT, Modality.AUDIO, ids, mask))


def test_bad_time_settings_are_named_at_config_load():
    with pytest.raises(ConfigError, match="model.heads.image.time_distribution: 'beta' is not valid; valid: uniform, logit_normal"):
        load_config(["tiny"], ["model.tasks=[text_to_image]", "model.heads.image={name: flow_matching, time_distribution: beta}"])
    with pytest.raises(ConfigError, match="time_shift > 0, got"):
        load_config(["tiny"], ["model.tasks=[text_to_image]", "model.heads.image={name: flow_matching, time_shift: 0.0}"])
    with pytest.raises(ConfigError, match="sample_shift must be > 0, got"):
        load_config(["tiny"], ["model.tasks=[text_to_image]", "model.heads.image={name: flow_matching, sample_shift: -1.0}"])
