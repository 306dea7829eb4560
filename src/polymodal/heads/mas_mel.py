"""Text -> audio from (text, speech) pairs alone: durations found by monotonic alignment search
(Glow-TTS), then the length regulator, the duration head and a mel decoder as in ``aligned_mel``.

Each source token's state gives a mean log-mel frame, or several in order (``states_per_token``;
the prior, a linear layer); MAS (``alignment_search.py``) finds the monotonic alignment of the
item's own frames to those means under unit-variance Gaussians, which gives each token its
duration in frames.
Three terms train on it: the prior (the frames' squared distance to their state's mean, Grad-TTS's
encoder loss; it is what makes the alignment mean something), the duration head
(log(1 + frames), ``length_regulator.duration_loss``) and the decoder, which reads the
length-regulated frame tokens through one backbone pass. The decoder either regresses the frames
(``decoder: regression``, L1 + L2 as ``aligned_mel``; it learns the average voice) or is a
flow-matching DiT over groups of frames conditioned frame by frame on those states
(``decoder: flow``; its samples differ in voice from one draw of noise to the next). Generation
predicts durations from the source alone, as ``aligned_mel``.

Nothing here needs the data to know where words lie: any (text, speech) manifest trains it. With
``references: true`` it learns from a dataset's reference speech instead of the items' own (one
voice per text; the built-in data has them), still aligned by MAS: the references' own timings are
only compared with MAS's durations (the ``duration_error`` metric, in frames per token).

References: Kim et al. 2020, Glow-TTS, arXiv:2005.11129 (MAS and a duration predictor trained on
its durations); Popov et al. 2021, Grad-TTS, arXiv:2105.06337 (the encoder's mean frames and
their loss; a generative decoder conditioned on the aligned means); Ren et al. 2019, FastSpeech,
arXiv:1905.09263 (length regulator); Lipman et al. 2022, arXiv:2210.02747 (flow matching).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.data.batch import AlignedTargets
from polymodal.decoders.dit import FlowTransformer
from polymodal.decoders.flow_sampling import SAMPLERS, integrate
from polymodal.decoders.mel_head import MelFrameHead
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.heads.aligned_mel import INIT_STD, SILENCE, log_mel_frames, mel_targets, padded_to
from polymodal.heads.length_regulator import PHASE_BUCKETS, duration_loss, predicted_durations, regulated_tokens
from polymodal.heads.state_alignment import TokenStateAlignment
from polymodal.losses.flow_matching import flow_matching_loss, interpolate, target_velocity
from polymodal.losses.mel import mel_loss
from polymodal.modality import Modality

DECODERS = ("regression", "flow")
FLOW_LOSS = "flow_matching"


@HEADS.register("mas_mel")
class MASMelHead(TokenStateAlignment, nn.Module):
    """Log-mel frames with durations from monotonic alignment search.

    Args:
        wiring: mel bands, the longest clip's frames and the log-mel statistics from ``wiring.shapes``.
        frames_per_token: log-mel frames each target token stands for (Tacotron's reduction factor).
        decoder: ``regression`` (L1 + L2 on the frames) or ``flow`` (flow matching; voices vary).
        flow: the flow decoder's DiT settings (``FlowTransformer``: dim, num_layers, num_heads, mlp_ratio).
        steps, sampler: the flow decoder's integration at generation.
        noise_scale: the flow decoder's starting noise is scaled by this (Grad-TTS's temperature).
        alignment_prior: weight of RAD-TTS's diagonal prior (``alignment_search.diagonal_log_prior``)
            added to the frames' log-likelihoods before MAS; 0: MAS on the likelihoods alone, which
            collapses when the head trains from scratch (the first token takes nearly every frame).
        references: learn from the dataset's reference speech (``AlignedTargets``) rather than the
            items' own; their timings are not used.
        states_per_token: mean frames each token has, in order (the states of a left-to-right HMM
            word model); MAS aligns the frames to every token's states and a token's duration is the
            sum of its states'. 1: one mean per token, as Glow-TTS for phonemes; a word spans several
            sounds, which one mean fits no better than it fits the neighbouring words' frames.
        silent_edges: [bos] and [eos] have one fixed mean, the silence frame, instead of learned
            ones: their states see the whole text, and learned means let them take any word's frames.

    The defaults (5 states per token, silent edges, the prior at 1) were measured on the built-in
    data's own voices, text->audio alone for 1,000 steps: judged 84.2% (held-out numbers 70.8%),
    against 3.6% for one learned mean per token and 77.8% for 3 states (BENCHMARKS.md).
    """

    target = Modality.AUDIO
    reads_references = False
    needs_image_tokenizer = False

    def __init__(
        self, wiring: HeadWiring, *, frames_per_token: int = 8, decoder: str = "regression", flow: dict | None = None,
        steps: int = 10, sampler: str = "heun", noise_scale: float = 1.0, alignment_prior: float = 1.0,
        references: bool = False, states_per_token: int = 5, silent_edges: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.reads_references = references
        if frames_per_token < 1:
            raise ValueError(f"frames_per_token must be >= 1, got {frames_per_token}")
        if decoder not in DECODERS or sampler not in SAMPLERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)} and sampler one of {', '.join(SAMPLERS)}")
        if states_per_token < 1:
            raise ValueError(f"states_per_token must be >= 1, got {states_per_token}")
        if alignment_prior < 0:
            raise ValueError(f"alignment_prior must be >= 0 (0: none), got {alignment_prior}")
        self.alignment_prior, self.states_per_token, self.silent_edges = alignment_prior, states_per_token, silent_edges
        shapes, dim = wiring.shapes, wiring.dim
        self.frames_per_token, self.num_mels = frames_per_token, shapes.num_mels
        self.num_frames = shapes.num_audio_frames
        self.max_tokens = math.ceil(self.num_frames / frames_per_token)
        self.prior_head = nn.Linear(dim, states_per_token * shapes.num_mels)  # each token's mean frames, normalised
        self.duration_head = nn.Linear(dim, 1)  # log(1 + frames) per source token
        self.phase_embed = nn.Embedding(PHASE_BUCKETS, dim)
        if decoder == "regression":
            self.decoder: nn.Module = MelFrameHead(dim, shapes.num_mels, frames_per_token=frames_per_token)
        else:
            self.decoder = FlowTransformer(frames_per_token * shapes.num_mels, self.max_tokens, None, dim, **(flow or {}))
        self.sampling = (steps, sampler, noise_scale)
        self.register_buffer("center", torch.tensor(float(shapes.log_mel_center)))
        self.register_buffer("scale", torch.tensor(float(shapes.log_mel_scale)))
        self.init_weights()

    def init_weights(self) -> None:
        for linear in (self.prior_head, self.duration_head):
            nn.init.normal_(linear.weight, std=INIT_STD)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.phase_embed.weight, std=INIT_STD)
        self.decoder.init_weights()

    def edge_frame(self) -> Tensor | None:
        """With ``silent_edges``: the silence frame, normalised, for [bos] and [eos]."""
        return ((SILENCE - self.center) / self.scale) if self.silent_edges else None

    def frame_tokens(self, trunk, source: Tensor, durations: Tensor) -> tuple[Tensor, Tensor]:
        """Frame-group tokens (B, J, D) with the audio type embedding, and their mask (B, J)."""
        tokens, inside = regulated_tokens(source, durations, self.phase_embed, self.frames_per_token, self.max_tokens)
        return tokens + trunk.type_embedding(Modality.AUDIO, tokens), inside

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets | AlignedTargets) -> HeadOutput:
        """The decoder's term (``""`` or ``flow_matching``), ``duration`` and ``prior``; with
        references, the metric ``duration_error``: mean |MAS's frames - the reference's| per token."""
        frame_mask = target.value_mask if isinstance(target, AlignedTargets) else target.mask
        frames = mel_targets(target.values, frame_mask, target.values.shape[1], self.center, self.scale)  # (B, F, M)
        read = trunk.source_states(source, source_mask)
        durations, prior = self.aligned_durations(read, source_mask, frames, frame_mask, self.edge_frame())
        tokens, token_mask = self.frame_tokens(trunk, source, durations)
        hidden = trunk.run(source, source_mask, tokens, token_mask)
        states = hidden[:, source.shape[1] :]  # (B, J, D)
        goal = mel_targets(target.values, frame_mask, states.shape[1] * self.frames_per_token, self.center, self.scale)
        losses = {"duration": duration_loss(self.duration_head, hidden[:, : source.shape[1]], source_mask, durations), "prior": prior}
        counts = {"duration": source_mask.sum(), "prior": frame_mask.sum()}
        metrics = {}
        if isinstance(target, AlignedTargets):
            error = (durations - target.durations[:, : durations.shape[1]]).abs()[source_mask]
            metrics["duration_error"] = float(error.mean())
        if isinstance(self.decoder, MelFrameHead):
            goal_mask = padded_to(frame_mask, goal.shape[1])
            losses[""], counts[""] = mel_loss(self.decoder(states), goal, goal_mask), goal_mask.sum()
        else:
            data = rearrange(goal, "b (j r) m -> b j (r m)", r=self.frames_per_token)  # (B, J, r M)
            noise, t = torch.randn_like(data), torch.rand(len(data), device=data.device)
            velocity = self.decoder(interpolate(noise, data, t), t, aligned=states, mask=token_mask)
            losses[FLOW_LOSS] = flow_matching_loss(velocity, target_velocity(noise, data), token_mask)
            counts[FLOW_LOSS] = token_mask.sum()
        return HeadOutput(hidden, losses, metrics, counts=counts)

    @torch.no_grad()
    def generate(
        self, trunk, source: Tensor, source_mask: Tensor, *, steps: int | None = None, noise_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """Log-mel frames (B, F, num_mels), natural log of power as ``LogMel`` makes them, silence
        after each item's predicted end: durations first, then one pass for every frame token, then
        the decoder (for ``flow``, from noise drawn from ``generator``)."""
        durations = predicted_durations(self.duration_head, trunk, source, source_mask)  # (B, Ns) frames
        tokens, token_mask = self.frame_tokens(trunk, source, durations)
        states = trunk.run(source, source_mask, tokens, token_mask)[:, source.shape[1] :]  # (B, J, D)
        if isinstance(self.decoder, MelFrameHead):
            frames = self.decoder(states)
        else:
            steps = self.sampling[0] if steps is None else steps
            noise_scale = self.sampling[2] if noise_scale is None else noise_scale
            shape = (*states.shape[:2], self.frames_per_token * self.num_mels)
            device = generator.device if generator is not None else states.device
            noise = noise_scale * torch.randn(shape, generator=generator, device=device).to(states.device, states.dtype)
            velocity = lambda x, t: self.decoder(x, t, aligned=states, mask=token_mask)  # noqa: E731
            made = integrate(velocity, noise, steps=steps, sampler=self.sampling[1])
            frames = rearrange(made, "b j (r m) -> b (j r) m", r=self.frames_per_token)
        return log_mel_frames(frames[:, : self.num_frames], durations.sum(1), self.center, self.scale)

