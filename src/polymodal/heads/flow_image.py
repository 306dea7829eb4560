"""Text (or any source) -> image by conditional flow matching: MetaQuery's learnable queries read
the source through the shared backbone, a connector makes their states the condition, and a small
velocity network cross-attending to it regresses the velocity from noise to the image: a DiT
(``decoders/dit.py``, the default) or a U-Net (``decoder: {name: unet}``, ``decoders/unet.py``;
under a perfect condition it draws readable digits far sooner than the DiT: BENCHMARKS.md, "A
U-Net velocity network for the flow image heads").

Training: x_t = t x1 + (1 - t) x0 between noise x0 and the item's own image (or its VAE latent)
x1, t drawn by ``time_distribution`` (uniform or SD3's logit-normal) and moved toward noise by
``time_shift``, MSE to u = x1 - x0 (``losses/flow_matching.py``), logged as
``<task>_flow_matching``; each item's condition is the empty one (the queries over no source) with
probability ``condition_dropout``. Generation integrates the velocity from noise in ``steps``
Euler or Heun steps on a grid moved by its own ``sample_shift`` (uniform by default) with
classifier-free guidance ``guidance`` (``decoders/flow_sampling.py``). The two shifts are apart
because they pull opposite ways here: the U-Net alone, trained with times shifted toward noise
(s = 3), read 41.8% of its samples after 1,000 steps on a uniform 8-step grid against 30.1%
unshifted, and 4.3% on the shifted grid, whose large steps near the data leave grain
(BENCHMARKS.md, "Guidance 4 and training times shifted toward noise"). With ``read_source`` the
condition is the source tokens' final states then the queries' (``heads/queries.py``, which says
why), with a mask that hides the source's padding; a dropped item's source slots are all padding,
as the empty condition's.

Pixels or latents: ``flow_matching`` works on pixels, ``flow_matching_latent`` on the latents of
the run's VAE (``model.image_tokenizer: {name: vae}``, trained in the run's first stage), divided
by their standard deviation (latent diffusion's scale, measured on the first batch unless set).
Compared with the same DiT alone under a perfect condition (BENCHMARKS.md, "Pixels or latents for
the flow DiT"): on an 8x VAE's 8 x 4 x 12 latents (patch 1: 48 tokens, as many as pixels at patch
8, and the same time per step) the judge reads 7.4% / 10.9% of samples (guidance 1 / 2) after
1,000 steps, against 3.9% / 5.1% on pixels; better, but strokes, not digits, and far below the
85% line, while the VAE alone caps it at 84% (its reconstructions; real images 91%). So the
``metaquery`` preset stayed on pixels: with the latent head it read 3.2% (pixels, an older run:
1.9%), still no readable numbers, for a first stage of 3 minutes of one thread.

References: Lipman et al. 2022, arXiv:2210.02747 and Liu et al. 2022, arXiv:2209.03003 (flow
matching, rectified flow); Pan et al. 2025, MetaQuery, arXiv:2504.06256 (queries, connector,
condition dropout 10%); Peebles and Xie 2022, DiT, arXiv:2212.09748; Ho and Salimans 2022,
classifier-free guidance, arXiv:2207.12598; Rombach et al. 2021, latent diffusion,
arXiv:2112.10752 (generating in an autoencoder's latent space).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.connectors import CONNECTORS
from polymodal.decoders.flow_networks import FLOW_NETWORKS, network_spec
from polymodal.decoders.flow_sampling import SAMPLERS, guided, integrate
from polymodal.errors import ConfigError
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.heads.image_codes import ImageCodeHead, best_of
from polymodal.heads.queries import LearnableQueries
from polymodal.losses.flow_matching import TIME_DISTRIBUTIONS, flow_matching_loss, interpolate, target_velocity, training_times
from polymodal.modality import Modality
from polymodal.tokenizers.vae import measure_latent_scale

DEFAULT_CONNECTOR = {"name": "mlp"}
CONDITION_DROPOUT = 0.1  # MetaQuery's share of empty captions in training
LOSS_NAME = "flow_matching"
CODE_LOSS_NAME = "codes"  # flow_matching_codes: the item's VQ codes read from the queries' states


def check_flow_settings(settings: Mapping[str, Any], where: str) -> None:
    """The nested settings of a flow head, at config load: ``connector`` against ``CONNECTORS``,
    ``decoder`` against ``FLOW_NETWORKS`` (the DiT unless it names another), and the sampler."""
    CONNECTORS.check(settings.get("connector") or DEFAULT_CONNECTOR, where=f"{where}.connector")
    decoder = settings.get("decoder") or {}
    if not isinstance(decoder, Mapping):
        raise ConfigError(f"{where}.decoder: expected a mapping of the flow decoder's settings, got {decoder!r}")
    FLOW_NETWORKS.check(network_spec(decoder), where=f"{where}.decoder")
    if settings.get("sampler", "heun") not in SAMPLERS:
        raise ConfigError(f"{where}.sampler: {settings['sampler']!r} is not valid; valid: {', '.join(SAMPLERS)}")
    if settings.get("time_distribution", "uniform") not in TIME_DISTRIBUTIONS:
        raise ConfigError(
            f"{where}.time_distribution: {settings['time_distribution']!r} is not valid; valid: {', '.join(TIME_DISTRIBUTIONS)}"
        )


class ImageFlowDecoder(nn.Module):
    """Queries, connector and a velocity network (DiT or U-Net) over patches of a (C, h, w) map: pixels or latents.

    Args:
        dim: the backbone width D.
        shape: (C, h, w) of the map the flow runs on.
        patch_size: p, the side of a patch token (h and w must divide by it).
        the rest: as ``FlowImageHead``.
    """

    def __init__(
        self, dim: int, shape: tuple[int, int, int], *, patch_size: int, num_queries: int, connector: dict,
        train_backbone: bool, read_source: bool, dim_condition: int, decoder: dict, condition_dropout: float,
        noise_draws: int, sampling: tuple[int, str, float], times: tuple[str, float], sample_shift: float, where: str,
        condition_grad: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        channels, height, width = shape
        if times[0] not in TIME_DISTRIBUTIONS or times[1] <= 0:
            raise ValueError(f"time_distribution must be one of {', '.join(TIME_DISTRIBUTIONS)} and time_shift > 0, got {times}")
        self.times = times  # (distribution, shift) of the training times
        if sample_shift <= 0:
            raise ValueError(f"sample_shift must be > 0, got {sample_shift}")
        self.sample_shift = sample_shift  # of the sampling grid
        if noise_draws < 1:
            raise ValueError(f"noise_draws must be >= 1, got {noise_draws}")
        self.noise_draws = noise_draws
        self.sampling = sampling  # (steps, sampler, guidance) unless a call gives its own
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the flow's map {height} x {width}")
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must lie in [0, 1), got {condition_dropout}")
        self.shape, self.patch, self.condition_dropout = shape, patch_size, condition_dropout
        self.grid = (height // patch_size, width // patch_size)
        self.queries = LearnableQueries(
            dim, dim_condition, Modality.IMAGE, num_queries=num_queries, connector=connector, train_backbone=train_backbone,
            read_source=read_source, condition_grad=condition_grad, where=where,
        )  # fmt: skip
        self.network = FLOW_NETWORKS.build(network_spec(decoder), channels * patch_size**2, self.grid, dim_condition, where=f"{where}.decoder")

    def init_weights(self) -> None:
        self.queries.init_weights()
        self.network.init_weights()

    def velocity(self, x: Tensor, t: Tensor, condition: Tensor, mask: Tensor | None = None) -> Tensor:
        """v(x_t, t, condition): (B, C, h, w), (B,), (B, Nc, dim_condition) and its mask (B, Nc)
        (True on real tokens; None: every one) -> (B, C, h, w)."""
        p = self.patch
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # (B, h' w', C p p)
        velocity = self.network(tokens, t, context=condition, context_mask=mask)
        return rearrange(velocity, "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid[0], p=p, q=p)

    def loss(self, trunk, source: Tensor, source_mask: Tensor, data: Tensor) -> tuple[Tensor, Tensor]:
        """(the pass's states (B, Ns + N, D), the flow-matching loss) for data (B, C, h, w)."""
        made = self.queries(trunk, source, source_mask)
        condition, mask = made.condition, made.mask
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(len(data), device=data.device) < self.condition_dropout  # (B,)
            empty = self.queries.empty(trunk, source, num_source=source.shape[1])
            condition = torch.where(dropped[:, None, None], empty.condition.to(condition.dtype), condition)
            if mask is not None:  # a dropped item's source slots all padding: exactly the empty condition
                mask = torch.where(dropped[:, None], empty.mask, mask)
        if self.noise_draws > 1:  # every item at several (noise, t) draws under one condition
            data = data.repeat_interleave(self.noise_draws, dim=0)  # (B k, C, h, w)
            condition = condition.repeat_interleave(self.noise_draws, dim=0)
            mask = None if mask is None else mask.repeat_interleave(self.noise_draws, dim=0)
        noise = torch.randn_like(data)
        t = training_times(len(data), distribution=self.times[0], shift=self.times[1], device=data.device)
        velocity = self.velocity(interpolate(noise, data, t), t, condition, mask)
        return made.hidden, flow_matching_loss(velocity, target_velocity(noise, data))

    @torch.no_grad()
    def sample(
        self, trunk, source: Tensor, source_mask: Tensor, *, steps: int | None, sampler: str | None, guidance: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:  # fmt: skip
        """(B, C, h, w) from noise (drawn from ``generator``) under the source's condition; the
        configured steps, sampler and guidance where a call gives None."""
        default_steps, default_sampler, default_guidance = self.sampling
        guidance = default_guidance if guidance is None else guidance
        made = self.queries(trunk, source, source_mask)
        empty = self.queries.empty(trunk, source, num_source=source.shape[1]) if guidance != 1.0 else None
        device = generator.device if generator is not None else source.device
        noise = torch.randn((len(source), *self.shape), generator=generator, device=device).to(source.device, source.dtype)
        velocity = guided(
            self.velocity, made.condition, None if empty is None else empty.condition, guidance, mask=made.mask,
            empty_mask=None if empty is None else empty.mask,
        )  # fmt: skip
        return integrate(
            velocity, noise, steps=default_steps if steps is None else steps, sampler=default_sampler if sampler is None else sampler,
            shift=self.sample_shift,
        )  # fmt: skip


@HEADS.register("flow_matching")
class FlowImageHead(nn.Module):
    """Images by flow matching in pixel space, conditioned by learnable queries.

    Args:
        wiring: the backbone width and the image size and channels.
        patch_size: the DiT's patch side in pixels (4: 8 x 24 tokens of a 32 x 96 image).
        num_queries: learnable query tokens.
        connector: the connector's spec (``polymodal.connectors``).
        train_backbone: whether this loss trains the backbone and source encoders (MetaQuery: no).
        read_source: whether the condition also carries the source tokens' final states before the
            queries' (``heads/queries.py``; off: the queries' alone, as MetaQuery).
        dim_condition: the condition tokens' width.
        decoder: the velocity network (``decoders/flow_networks.py``): the DiT's settings
            (``FlowTransformer``: dim, num_layers, num_heads, mlp_ratio, conv_kernel) by default, or
            ``name: unet`` and the U-Net's (``FlowUNet``: channels, channel_mults, ...).
        condition_dropout: share of items trained with the empty condition.
        noise_draws: (noise, t) draws per item and step, all under the item's one condition: the
            decoder trains on this many times the batch for one backbone pass (MAR's diffusion
            batch multiplier, Li et al. 2024, arXiv:2406.11838).
        guidance: classifier-free guidance scale at generation (1: none).
        sampler: ``heun`` or ``euler``.
        steps: integration steps at generation.
        time_distribution: training times ``uniform`` or ``logit_normal`` (SD3).
        time_shift: SD3's shift of the training times toward noise (1: none).
        sample_shift: the same shift of the sampling grid (1: uniform), apart from the training
            times' (the module docstring says why).
    """

    target = Modality.IMAGE
    reads_references = False
    needs_image_tokenizer = False
    check_settings = staticmethod(check_flow_settings)

    def __init__(
        self, wiring: HeadWiring, *, patch_size: int = 4, num_queries: int = 32, connector: dict | None = None,
        train_backbone: bool = True, read_source: bool = False, dim_condition: int = 128, decoder: dict | None = None,
        condition_dropout: float = CONDITION_DROPOUT, noise_draws: int = 1, guidance: float = 2.0, sampler: str = "heun",
        steps: int = 10, time_distribution: str = "uniform", time_shift: float = 1.0,
        sample_shift: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        height, width = wiring.shapes.image_size
        self.flow = ImageFlowDecoder(
            wiring.dim, (wiring.shapes.image_channels, height, width), patch_size=patch_size, num_queries=num_queries,
            connector=connector or DEFAULT_CONNECTOR, train_backbone=train_backbone, read_source=read_source,
            dim_condition=dim_condition,
            decoder=decoder or {}, condition_dropout=condition_dropout, noise_draws=noise_draws,
            sampling=(steps, sampler, guidance), times=(time_distribution, time_shift), sample_shift=sample_shift,
            where="model.heads.image",
        )  # fmt: skip

    def init_weights(self) -> None:
        self.flow.init_weights()

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        hidden, loss = self.flow.loss(trunk, source, source_mask, target.values)
        return HeadOutput(hidden, {LOSS_NAME: loss})

    @torch.no_grad()
    def generate(
        self, trunk, source: Tensor, source_mask: Tensor, *, steps: int | None = None, sampler: str | None = None,
        guidance: float | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Images (B, C, H, W) in [-1, 1]; the configured sampling unless given here."""
        images = self.flow.sample(trunk, source, source_mask, steps=steps, sampler=sampler, guidance=guidance, generator=generator)
        return images.clamp(-1.0, 1.0)


@HEADS.register("flow_matching_codes")
class CodedFlowImageHead(nn.Module):
    """Images by flow matching in pixel space, from learnable queries that the item's own VQ codes
    teach. There is one query per column of the run's code grid (stage 1's frozen VQ-VAE). After
    the queries' pass, the image's codes follow their final states through the backbone, column
    after column, as a ``vq_codes`` head (``heads/image_codes.py``) draws them from a caption, but
    with the queries' states as the whole source: the codes never see the caption, so what they
    need of it must pass through the queries (BLIP-2's Q-Former is trained the same way, its text
    reading the image only through the queries). That cross-entropy (logged as ``<task>_codes``)
    trains the queries, the backbone and the source encoders; the flow loss trains only the
    connector and the velocity network (``LearnableQueries(condition_grad=False)``). Generation
    uses the flow path; the codes are never drawn. With ``candidates`` K > 1 it draws K images per
    item and keeps the one whose VQ codes the teacher finds likeliest after the item's queries (the
    head's own reranker, where DALL-E reranked with a separately trained CLIP).

    Why: from scratch, the flow loss alone does not teach the text path what a caption draws where
    (a ``flow_matching`` head reads 3-7% of its images as the asked number). Under a backbone that
    cross-entropy on VQ codes has trained, the same velocity network draws the asked number
    (BENCHMARKS.md, "The `metaquery` head on a trained `generation` run's backbone"). This head
    does both in one run: text->image alone from scratch reads 82.8% / 66.9% (held-out numbers
    70.0% / 47.0%) at seeds 0 / 1 after 4,000 steps, and seed 0 88.1% (77.7%) sampled at guidance 6
    with 16 Heun steps, the ``metaquery`` preset's setting. A linear map from each query's state to
    its column's codes taught the queries far less (36.95%; BENCHMARKS.md, "Flow image heads whose
    queries the VQ codes teach").

    Args:
        wiring: needs ``image_tokenizer``: a trained VQ-VAE (``model.image_tokenizer: {name: vqvae}``).
        candidates: images drawn per item at generation, of which the one the teacher finds
            likeliest is kept (1: no reranking).
        the rest: as ``FlowImageHead``; the queries are as many as the code grid's columns, and the
            backbone always learns from the codes' loss.
    """

    target = Modality.IMAGE
    reads_references = False
    needs_image_tokenizer = True
    check_settings = staticmethod(check_flow_settings)

    def __init__(
        self, wiring: HeadWiring, *, patch_size: int = 4, connector: dict | None = None, read_source: bool = False,
        dim_condition: int = 128, decoder: dict | None = None, condition_dropout: float = CONDITION_DROPOUT,
        noise_draws: int = 1, guidance: float = 2.0, sampler: str = "heun", steps: int = 10,
        time_distribution: str = "uniform", time_shift: float = 1.0, sample_shift: float = 1.0, candidates: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(candidates, int) or candidates < 1:
            raise ConfigError(
                f"model.heads.image.candidates: {candidates!r} must be an integer >= 1 (images drawn per item, the likeliest kept)"
            )
        self.candidates = candidates
        tokenizer = wiring.image_tokenizer
        if tokenizer is None or not hasattr(tokenizer, "num_codes"):
            raise ConfigError("the flow_matching_codes head needs a trained VQ image tokenizer: set model.image_tokenizer: {name: vqvae}")
        height, width = wiring.shapes.image_size
        rows, columns = tokenizer.token_grid(height, width)
        # The codes column after column (one backbone position per column of codes); it holds the frozen tokenizer.
        self.teacher = ImageCodeHead(wiring, order="columns", group=(rows, 1))
        self.flow = ImageFlowDecoder(
            wiring.dim, (wiring.shapes.image_channels, height, width), patch_size=patch_size, num_queries=columns,
            connector=connector or DEFAULT_CONNECTOR, train_backbone=True, read_source=read_source, dim_condition=dim_condition,
            decoder=decoder or {}, condition_dropout=condition_dropout, noise_draws=noise_draws,
            sampling=(steps, sampler, guidance), times=(time_distribution, time_shift), sample_shift=sample_shift,
            where="model.heads.image", condition_grad=False,
        )  # fmt: skip

    @property
    def tokenizer(self) -> nn.Module:
        """The run's frozen VQ-VAE (the teacher's; ``AnyToAnyModel.image_tokenizer`` finds it here)."""
        return self.teacher.tokenizer

    def init_weights(self) -> None:
        self.flow.init_weights()

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        hidden, flow = self.flow.loss(trunk, source, source_mask, target.values)
        queries = hidden[:, source.shape[1] :]  # (B, w, D) the queries' final states: the codes' whole source
        every = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        taught = self.teacher.loss(trunk, queries, every, target)
        return HeadOutput(hidden, {LOSS_NAME: flow, CODE_LOSS_NAME: taught.losses[""]}, {"code_acc": taught.metrics["token_acc"]})

    @torch.no_grad()
    def code_log_likelihood(self, trunk, source: Tensor, source_mask: Tensor, images: Tensor) -> Tensor:
        """log p(codes of each image | the queries' states over its source) under the teacher: (B,)
        for images (B, C, H, W) and their sources (B, Ns, D), (B, Ns)."""
        queries = self.flow.queries(trunk, source, source_mask).hidden[:, source.shape[1] :]  # (B, w, D)
        every = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        codes = self.teacher.to_sequence(self.tokenizer.encode(images))  # (B, h * w), column after column
        return self.teacher.log_likelihood(trunk, queries, every, codes)

    @torch.no_grad()
    def generate(
        self, trunk, source: Tensor, source_mask: Tensor, *, steps: int | None = None, sampler: str | None = None,
        guidance: float | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Images (B, C, H, W) in [-1, 1] by the flow path (the configured sampling unless given
        here); with ``candidates`` K > 1, of K drawn per item the one whose codes the teacher finds
        likeliest under the item's source."""
        k = self.candidates
        source, source_mask = source.repeat(k, 1, 1), source_mask.repeat(k, 1)  # candidate c of item b at c * B + b
        images = self.flow.sample(trunk, source, source_mask, steps=steps, sampler=sampler, guidance=guidance, generator=generator)
        images = images.clamp(-1.0, 1.0)
        if k == 1:
            return images
        return best_of(images, self.code_log_likelihood(trunk, source, source_mask, images), k)


@HEADS.register("flow_matching_latent")
class LatentFlowImageHead(nn.Module):
    """Images by flow matching on the latents of the run's frozen VAE, conditioned by learnable queries.

    Args:
        wiring: needs ``image_tokenizer``: a trained VAE (``model.image_tokenizer: {name: vae}``).
        latent_scale: latents are divided by this before the flow (latent diffusion's scale factor,
            so the flow's data has about unit spread like its noise); None: the standard deviation
            of the first training batch's latents (``tokenizers.vae.measure_latent_scale``), kept with the
            weights. Under data parallelism rank 0's value reaches the others from the second step.
        patch_size: the DiT's patch side in latent positions.
        the rest: as ``FlowImageHead``.
    """

    target = Modality.IMAGE
    reads_references = False
    needs_image_tokenizer = True
    check_settings = staticmethod(check_flow_settings)

    def __init__(
        self, wiring: HeadWiring, *, latent_scale: float | None = None, patch_size: int = 1, num_queries: int = 32,
        connector: dict | None = None, train_backbone: bool = True, read_source: bool = False, dim_condition: int = 128,
        decoder: dict | None = None, condition_dropout: float = CONDITION_DROPOUT, noise_draws: int = 1, guidance: float = 2.0,
        sampler: str = "heun", steps: int = 10, time_distribution: str = "uniform", time_shift: float = 1.0,
        sample_shift: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        tokenizer = wiring.image_tokenizer
        if tokenizer is None or not hasattr(tokenizer, "posterior"):
            raise ValueError("the flow_matching_latent head needs a trained VAE image tokenizer (model.image_tokenizer: {name: vae})")
        if latent_scale is not None and not latent_scale > 0:
            raise ValueError(f"latent_scale must be > 0, or None to measure it on the first training batch; got {latent_scale}")
        tokenizer.requires_grad_(False)
        self.tokenizer = tokenizer.eval()
        height, width = wiring.shapes.image_size
        factor = tokenizer.downsample_factor
        # NaN until measured: a buffer, so the measured scale is saved and loaded with the weights.
        self.register_buffer("latent_scale", torch.tensor(float("nan") if latent_scale is None else float(latent_scale)))
        self.flow = ImageFlowDecoder(
            wiring.dim, (tokenizer.dim, height // factor, width // factor), patch_size=patch_size, num_queries=num_queries,
            connector=connector or DEFAULT_CONNECTOR, train_backbone=train_backbone, read_source=read_source,
            dim_condition=dim_condition,
            decoder=decoder or {}, condition_dropout=condition_dropout, noise_draws=noise_draws,
            sampling=(steps, sampler, guidance), times=(time_distribution, time_shift), sample_shift=sample_shift,
            where="model.heads.image",
        )  # fmt: skip

    def init_weights(self) -> None:
        self.flow.init_weights()

    def train(self, mode: bool = True) -> "LatentFlowImageHead":
        """As ``nn.Module.train``, but the frozen tokenizer stays in eval mode."""
        super().train(mode)
        self.tokenizer.eval()
        return self

    def scale(self) -> Tensor:
        """The latent scale (), once set by the config or the first training batch."""
        if torch.isnan(self.latent_scale):
            raise RuntimeError("the latent flow head's latent_scale is not set: train the head, or set model.heads.image.latent_scale")
        return self.latent_scale

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        latents = self.tokenizer.encode(target.values)  # (B, dim, h, w), the posterior mean
        if self.training and torch.isnan(self.latent_scale):
            self.latent_scale.fill_(measure_latent_scale(latents).item())
        latents = latents / self.scale()
        hidden, loss = self.flow.loss(trunk, source, source_mask, latents)
        return HeadOutput(hidden, {LOSS_NAME: loss})

    @torch.no_grad()
    def generate(
        self, trunk, source: Tensor, source_mask: Tensor, *, steps: int | None = None, sampler: str | None = None,
        guidance: float | None = None, generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Images (B, C, H, W) in [-1, 1]: latents sampled (the configured sampling unless given
        here), then decoded by the VAE."""
        latents = self.flow.sample(trunk, source, source_mask, steps=steps, sampler=sampler, guidance=guidance, generator=generator)
        return self.tokenizer.decode(latents * self.scale()).clamp(-1.0, 1.0)
