"""The any-to-any model: per-modality encoders and projectors, a modality-type embedding, ONE shared
transformer over source and target tokens in a prefix-LM layout, and a decoder head per target
modality: an LM head for text, a head over VQ-VAE codes for images, a mel-frame head for audio,
plus pooled, normalised per-modality embeddings for contrastive alignment.

Reference: seed 000 (modality encoders + shared backbone + modality decoders); the prefix-LM layout
of Raffel et al. 2019, T5, arXiv:1910.10683 (section 3.2.1); LLaVA-style projection of encoder
tokens into the backbone width, Liu et al. 2023, arXiv:2304.08485; images as VQ codes, Ramesh et
al. 2021, DALL-E, arXiv:2102.12092 (here predicted in parallel, not autoregressively); mel frames
with a reduction factor, Tacotron, arXiv:1703.10135; durations and a length regulator, FastSpeech,
arXiv:1905.09263; CLIP's symmetric InfoNCE, arXiv:2103.00020.

One sequence per task and item:  [source tokens] [target tokens ...]
bidirectional over the source, causal over the target, sources never see targets. Targets:
  * text:  BOS + caption ids, next-token cross-entropy (LM head tied to the target embedding);
  * image and audio: FastSpeech-style (Ren et al. 2019, arXiv:1905.09263), non-autoregressive.
    The source is the number as a writer writes it (its digits) or a speaker says it (its words);
    the target is its reference rendering (one handwriting, one voice), aligned token by token
    (``data/references.py``). A duration head on the source states predicts how much of the
    target each token covers (pixel columns, log-mel frames); the length regulator turns the
    durations into target tokens, each a copy of the source token it falls in plus an embedding
    of where in that token it lies. An image has one target token per VQ code (a column's tokens
    differ by a row embedding), each classifying the frozen VQ-VAE's code there; audio has one
    per ``frames_per_token`` log-mel frames, each regressing them. One pass makes the whole
    target. Training uses the true durations, generation the predicted ones.
Because sources never attend targets, the source positions of any task's sequence hold exactly
what a pass over the source alone would: the contrastive embedding of a modality is their masked
mean, shared with the generation tasks at no extra backbone cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.data.audio import LOG_FLOOR
from polymodal.data.batch import AlignedTargets, Batch
from polymodal.decoders.mel_head import MelFrameHead
from polymodal.decoders.sampling import sample_next
from polymodal.losses.mel import mel_loss
from polymodal.losses.temperature import LogitScale
from polymodal.modality import Modality
from polymodal.models.alignment import (
    MODALITY_INDEX,
    PAIRS,
    masked_mean,
    pair_losses,
    source_pass,
    type_embedding,
)
from polymodal.models.length_regulator import (
    PHASE_BUCKETS,
    align_frames,
    duration_loss,
    gather_tokens,
    predicted_durations,
)
from polymodal.models.masks import prefix_lm_mask
from polymodal.models.output import StepOutput

# Task name -> (source modality, target modality).
TASKS: dict[str, tuple[Modality, Modality]] = {
    "image_to_text": (Modality.IMAGE, Modality.TEXT),
    "audio_to_text": (Modality.AUDIO, Modality.TEXT),
    "text_to_image": (Modality.TEXT, Modality.IMAGE),
    "text_to_audio": (Modality.TEXT, Modality.AUDIO),
}
# Contrastive alignment between every pair of modalities with an encoder.
CONTRASTIVE = "contrastive"
TASK_NAMES = (*TASKS, CONTRASTIVE)
CONTRASTIVE_PREFIX = "contrastive_"

# Log-mel targets are regressed as (x - MEL_CENTER) / MEL_SCALE: the built-in speech's real frames
# have median -8.1 and interquartile range 6.5 nats, so targets start near the head's zero output.
MEL_CENTER = -8.0
MEL_SCALE = 6.0
SILENCE = math.log(LOG_FLOOR)  # the log-mel of silence: the target past a clip's end


@dataclasses.dataclass(frozen=True)
class TextSpecials:
    """Token ids the LM needs from the tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int


@dataclasses.dataclass(frozen=True)
class AudioTargets:
    """What the mel head predicts: up to ``num_frames`` frames of ``num_mels`` bands,
    ``frames_per_token`` per frame-group token."""

    num_mels: int
    num_frames: int
    frames_per_token: int = 8

    @property
    def num_tokens(self) -> int:
        return math.ceil(self.num_frames / self.frames_per_token)


# Target modality -> the method computing that target's loss.
TARGET_LOSS = {Modality.TEXT: "_text_loss", Modality.IMAGE: "_image_loss", Modality.AUDIO: "_audio_loss"}


def check_task_fractions(task_fractions: dict[str, float], tasks: list[str]) -> None:
    """Each fraction names one of ``tasks``' generation tasks and lies in (0, 1]; a ValueError otherwise."""
    for task, fraction in task_fractions.items():
        if task not in TASKS or task not in tasks:
            valid = ", ".join(t for t in tasks if t in TASKS)
            raise ValueError(f"task_fractions.{task}: not a generation task of this model; valid: {valid}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"task_fractions.{task}: must lie in (0, 1], got {fraction}")


class AnyToAnyModel(nn.Module):
    """Wiring only: takes built parts (see ``polymodal.models.build``).

    Args:
        encoders, projectors: per source modality.
        backbone: the shared transformer (``forward(tokens, *, mask, positions, cache)``).
        dim: its width D.
        text: the tokenizer's specials (text targets).
        tasks: names from ``TASK_NAMES``.
        image_tokenizer: a trained VQ-VAE (``encode``/``decode``, ``num_codes``), frozen here;
            needed by ``text_to_image``.
        image_size: (H, W) of the images, to size the code grid.
        audio: the mel targets; needed by ``text_to_audio``.
        embed_dim: width of the contrastive embeddings (a bias-free linear head per modality).
        unique_labels: one item per label in each contrastive pair (no same-class negatives).
        task_fractions: per task, the share of a batch's items it trains on (the first ones of
            the shuffled batch; default 1): the long-sequence tasks can take fewer items per step.
    """

    def __init__(
        self,
        *,
        encoders: dict[Modality, nn.Module],
        projectors: dict[Modality, nn.Module],
        backbone: nn.Module,
        dim: int,
        text: TextSpecials,
        tasks: list[str],
        image_tokenizer: nn.Module | None = None,
        image_size: tuple[int, int] | None = None,
        audio: AudioTargets | None = None,
        embed_dim: int = 128,
        unique_labels: bool = True,
        task_fractions: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.task_fractions = dict(task_fractions or {})
        check_task_fractions(self.task_fractions, tasks)
        for task in tasks:
            if task not in TASK_NAMES:
                raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_NAMES)}")
            if task in TASKS and TASKS[task][0] not in encoders:
                raise ValueError(f"task {task} needs a {TASKS[task][0]} encoder")
        self.encoders = nn.ModuleDict({m.value: e for m, e in encoders.items()})
        self.projectors = nn.ModuleDict({m.value: p for m, p in projectors.items()})
        self.backbone = backbone
        self.modality_embed = nn.Embedding(len(MODALITY_INDEX), dim)
        self.text_embed = nn.Embedding(text.vocab_size, dim)  # target-side text tokens
        self.lm_head = nn.Linear(dim, text.vocab_size, bias=False)
        self.lm_head.weight = self.text_embed.weight  # tied (Press & Wolf 2016, arXiv:1608.05859)
        self.text = text
        self.tasks = list(tasks)
        self.dim = dim

        self.image_tokenizer = None
        if "text_to_image" in tasks:
            if image_tokenizer is None or image_size is None:
                raise ValueError("text_to_image needs a trained image_tokenizer and the image_size")
            image_tokenizer.requires_grad_(False)
            self.image_tokenizer = image_tokenizer.eval()
            self.code_grid = image_tokenizer.token_grid(*image_size)  # (h, w)
            self.column_pixels = image_size[1] / self.code_grid[1]
            self.num_codes = image_tokenizer.num_codes
            self.column_phase_embed = nn.Embedding(PHASE_BUCKETS, dim)
            self.row_embed = nn.Embedding(self.code_grid[0], dim)
            self.width_head = nn.Linear(dim, 1)  # log(1 + pixel columns) per source token
            self.code_head = nn.Linear(dim, self.num_codes, bias=False)

        self.audio = audio
        if "text_to_audio" in tasks:
            if audio is None:
                raise ValueError("text_to_audio needs the AudioTargets (mel bands and clip length)")
            self.phase_embed = nn.Embedding(PHASE_BUCKETS, dim)
            self.duration_head = nn.Linear(dim, 1)  # log(1 + frames) per source token
            self.mel_head = MelFrameHead(dim, audio.num_mels, frames_per_token=audio.frames_per_token)

        self.pairs: list[tuple[Modality, Modality]] = []
        self.unique_labels = unique_labels
        if CONTRASTIVE in tasks:
            self.pairs = [p for p in PAIRS if p[0] in encoders and p[1] in encoders]
            if not self.pairs:
                raise ValueError(f"contrastive needs encoders of two modalities; have {', '.join(map(str, encoders))}")
            paired = sorted({m for pair in self.pairs for m in pair}, key=list(Modality).index)
            self.embed_heads = nn.ModuleDict({m.value: nn.Linear(dim, embed_dim, bias=False) for m in paired})
            self.logit_scale = LogitScale()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        nn.init.normal_(self.text_embed.weight, std=0.02)
        if self.image_tokenizer is not None:
            for table in (self.column_phase_embed, self.row_embed, self.code_head):
                nn.init.normal_(table.weight, std=0.02)
            nn.init.normal_(self.width_head.weight, std=0.02)
            nn.init.zeros_(self.width_head.bias)
        if "text_to_audio" in self.tasks:
            nn.init.normal_(self.phase_embed.weight, std=0.02)
            nn.init.normal_(self.duration_head.weight, std=0.02)
            nn.init.zeros_(self.duration_head.bias)
            self.mel_head.init_weights()
        if self.pairs:
            for head in self.embed_heads.values():
                nn.init.normal_(head.weight, std=self.dim**-0.5)  # CLIP: width^-0.5 on the projections
            self.logit_scale.init_weights()

    def train(self, mode: bool = True) -> "AnyToAnyModel":
        """As ``nn.Module.train``, but the frozen image tokenizer stays in eval mode (its EMA
        codebook must not move)."""
        super().train(mode)
        if self.image_tokenizer is not None:
            self.image_tokenizer.eval()
        return self

    # ------------------------------------------------------------------ encoding

    def encode_source(self, modality: Modality, inputs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Encoder -> projector -> + modality-type embedding.

        Returns:
            tokens (B, N, D) and mask (B, N) bool (True on real tokens).
        """
        if modality.value not in self.encoders:
            raise ValueError(f"this model has no {modality} encoder; it has {', '.join(self.encoders)}")
        encoder = self.encoders[modality.value]
        out = encoder(inputs) if mask is None or modality is Modality.IMAGE else encoder(inputs, mask)
        tokens = self.projectors[modality.value](out.tokens, out.mask)
        tokens = tokens + type_embedding(self.modality_embed, modality, tokens)
        if out.mask is not None and tokens.shape[1] == out.tokens.shape[1]:
            return tokens, out.mask  # a per-token projector keeps the padding
        # No padding, or learned queries that already read only the real tokens.
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def embed_text_targets(self, ids: Tensor) -> Tensor:
        tokens = self.text_embed(ids)  # (B, L, D)
        return tokens + type_embedding(self.modality_embed, Modality.TEXT, tokens)

    def code_tokens(self, source: Tensor, widths: Tensor) -> Tensor:
        """One target token per VQ code (B, h * w, D), raster order, from the source tokens'
        ``widths`` (B, Ns) in pixel columns: the source token its column reads, where in it, its row."""
        height, width = self.code_grid
        index, phase, _ = align_frames(widths, self.column_pixels, width)  # (B, w)
        columns = gather_tokens(source, index) + self.column_phase_embed(phase)  # (B, w, D)
        tokens = (columns[:, None, :, :] + self.row_embed.weight[None, :, None, :]).flatten(1, 2)  # (B, h * w, D)
        return tokens + type_embedding(self.modality_embed, Modality.IMAGE, tokens)

    def frame_tokens(self, source: Tensor, durations: Tensor) -> tuple[Tensor, Tensor]:
        """Frame-group tokens (B, J, D) and their mask (B, J) from the source tokens' ``durations``
        (B, Ns) in log-mel frames: the source token each reads, and where in it."""
        step = self.audio.frames_per_token
        count = min(max(math.ceil(float(durations.sum(1).max()) / step), 1), self.audio.num_tokens)
        index, phase, inside = align_frames(durations, step, count)
        tokens = gather_tokens(source, index) + self.phase_embed(phase)
        return tokens + type_embedding(self.modality_embed, Modality.AUDIO, tokens), inside

    def run(self, source: Tensor, source_mask: Tensor, target: Tensor, target_mask: Tensor, *, cache=None) -> Tensor:
        """The backbone over ``[source][target]`` in the prefix-LM layout.

        Args:
            source: (B, Ns, D) projected source tokens; source_mask (B, Ns).
            target: (B, Lt, D) embedded target tokens; target_mask (B, Lt).
            cache: a backbone KV cache to fill (generation prefill), or None.

        Returns:
            (B, Ns + Lt, D) final states.
        """
        tokens = torch.cat([source, target], dim=1)  # (B, Ns + Lt, D)
        valid = torch.cat([source_mask, target_mask], dim=1)
        is_target = torch.zeros_like(valid)
        is_target[:, source.shape[1] :] = True
        # Positions count real tokens only, so padding a batch does not shift anyone's RoPE phases.
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        return self.backbone(tokens, mask=prefix_lm_mask(is_target, valid), positions=positions, cache=cache)

    def text_logits(
        self, source: Tensor, source_mask: Tensor, target_ids: Tensor, target_mask: Tensor, *, cache=None
    ) -> Tensor:
        """Teacher-forced LM logits (B, Lt, V) over the target positions; position t predicts token t + 1."""
        hidden = self.run(source, source_mask, self.embed_text_targets(target_ids), target_mask, cache=cache)
        return self.lm_head(hidden[:, source.shape[1] :])

    def embed(self, modality: Modality, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unit-norm contrastive embeddings (B, embed_dim) float32 of one modality's inputs, from a
        pass over the source alone (the same states its generation tasks see)."""
        if not self.pairs or modality.value not in self.embed_heads:
            raise ValueError(f"this model has no contrastive {modality} embedding (add the task {CONTRASTIVE!r})")
        source, source_mask = self.encode_source(modality, inputs, mask)
        return self._project(modality, masked_mean(source_pass(self.backbone, source, source_mask), source_mask))

    def _project(self, modality: Modality, pooled: Tensor) -> Tensor:
        # fp32 island: these vectors make the InfoNCE logits, up to 100x their cosine.
        return F.normalize(self.embed_heads[modality.value](pooled).float(), dim=-1)

    # ------------------------------------------------------------------ training

    def forward(self, batch: Batch) -> StepOutput:
        losses: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        pooled: dict[Modality, Tensor] = {}  # source states' masked means, over batch.present[m] rows
        for task in self.tasks:
            if task == CONTRASTIVE:
                continue
            source_modality, target_modality = TASKS[task]
            aligned = batch.references.get(target_modality) if target_modality is not Modality.TEXT else None
            if target_modality is not Modality.TEXT:  # the item's reference rendering (see above)
                if aligned is None:
                    continue
                keep = aligned.present
                source_inputs, source_masks = aligned.ids, aligned.mask
            elif source_modality in batch.inputs and target_modality in batch.inputs:
                keep = batch.present[source_modality] & batch.present[target_modality]
                source_inputs, source_masks = batch.inputs[source_modality], batch.masks.get(source_modality)
            else:
                continue
            if task in self.task_fractions:  # the first ceil(f * n) of the n usable items
                rank = keep.long().cumsum(0)  # (B,) 1-based rank among the usable items
                keep = keep & (rank <= math.ceil(self.task_fractions[task] * int(keep.sum())))
            if not keep.any():
                continue
            source, source_mask = self.encode_source(
                source_modality, source_inputs[keep], None if source_masks is None else source_masks[keep]
            )
            if aligned is not None:
                target, target_mask = aligned.select(keep), None
            else:
                target, target_mask = batch.inputs[target_modality][keep], _mask_of(batch, target_modality, keep)
            loss_fn = getattr(self, TARGET_LOSS[target_modality])
            hidden, task_losses, task_metrics = loss_fn(source, source_mask, target, target_mask)
            losses.update({task if not k else f"{task}_{k}": v for k, v in task_losses.items()})
            metrics.update({f"{task}_{k}": v for k, v in task_metrics.items()})
            if (
                self.pairs
                and aligned is None  # the source is the items' own input
                and source_modality not in pooled
                and bool((keep == batch.present[source_modality]).all())
            ):
                pooled[source_modality] = masked_mean(hidden[:, : source.shape[1]], source_mask)
        if self.pairs:
            self._contrastive(batch, pooled, losses, metrics)
        if not losses:
            raise ValueError(f"the batch has none of the inputs the tasks {self.tasks} need (has {list(batch.inputs)})")
        return StepOutput(losses, metrics)

    def _text_loss(self, source: Tensor, source_mask: Tensor, ids: Tensor, mask: Tensor):
        hidden = self.run(source, source_mask, self.embed_text_targets(ids[:, :-1]), mask[:, :-1])
        logits = self.lm_head(hidden[:, source.shape[1] :])  # (B, Lt - 1, V)
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # -100: ignored by cross_entropy
        loss, metrics = _token_loss(logits, labels)
        return hidden, {"": loss}, metrics

    def _image_loss(self, source: Tensor, source_mask: Tensor, target: AlignedTargets, _: None):
        """Every VQ code at once, through the length regulator with the true widths; and the widths."""
        codes = self.image_tokenizer.encode(target.values).flatten(1)  # (B, h * w) raster order
        tokens = self.code_tokens(source, target.durations)
        hidden = self.run(source, source_mask, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        loss, metrics = _token_loss(self.code_head(hidden[:, source.shape[1] :]), codes)
        width = duration_loss(self.width_head, hidden[:, : source.shape[1]], source_mask, target.durations)
        return hidden, {"": loss, "width": width}, metrics

    def _audio_loss(self, source: Tensor, source_mask: Tensor, target: AlignedTargets, _: None):
        """Mel frames through the length regulator with the true durations; and the durations."""
        tokens, token_mask = self.frame_tokens(source, target.durations)
        hidden = self.run(source, source_mask, tokens, token_mask)
        predicted = self.mel_head(hidden[:, source.shape[1] :])  # (B, J * r, M), normalised units
        mels = self.mel_targets(target.values, target.value_mask, predicted.shape[1])
        frame_mask = torch.zeros(predicted.shape[:2], dtype=torch.bool, device=predicted.device)
        real = target.value_mask[:, : predicted.shape[1]]
        frame_mask[:, : real.shape[1]] = real
        duration = duration_loss(self.duration_head, hidden[:, : source.shape[1]], source_mask, target.durations)
        return hidden, {"": mel_loss(predicted, mels, frame_mask), "duration": duration}, {}

    def mel_targets(self, log_mels: Tensor, frame_mask: Tensor, num_frames: int) -> Tensor:
        """Collated log-mels (B, F, M) -> normalised targets (B, num_frames, M): the real frames,
        then silence to the end (cut if the clip is longer)."""
        batch, frames, bands = log_mels.shape
        clip = log_mels.masked_fill(~frame_mask[:, :, None], SILENCE)[:, :num_frames]  # (B, min(F, n), M)
        target = torch.full((batch, num_frames, bands), SILENCE, dtype=log_mels.dtype, device=log_mels.device)
        target[:, : clip.shape[1]] = clip
        return (target - MEL_CENTER) / MEL_SCALE

    def _contrastive(
        self, batch: Batch, pooled: dict[Modality, Tensor], losses: dict[str, Tensor], metrics: dict[str, float]
    ) -> None:
        embedded: dict[Modality, Tensor] = {}
        for modality in (Modality(k) for k in self.embed_heads):
            if modality not in batch.inputs or not batch.present[modality].any():
                continue
            if modality in pooled:  # from a generation task's source positions
                embedded[modality] = self._project(modality, pooled[modality])
            else:
                present = batch.present[modality]
                embedded[modality] = self.embed(modality, batch.inputs[modality][present], _mask_of(batch, modality, present))
        scale = self.logit_scale()
        pair_loss, pair_metrics = pair_losses(
            embedded, batch, self.pairs, scale, prefix=CONTRASTIVE_PREFIX, unique_labels=self.unique_labels
        )
        losses.update(pair_loss)
        metrics.update(pair_metrics)
        metrics["logit_scale"] = float(scale.detach())

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _generate_tokens(
        self,
        source: Tensor,
        source_mask: Tensor,
        *,
        bos_id: int,
        embed: Callable[[Tensor], Tensor],
        head: Callable[[Tensor], Tensor],
        num_tokens: int,
        eos_id: int | None,
        pad_id: int,
        temperature: float,
        top_k: int,
        top_p: float,
        use_cache: bool,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Autoregressive decoding after a source: (B, 1 + n) ids starting with ``bos_id``, n <= num_tokens."""
        batch_size, num_source = source_mask.shape
        ids = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=source.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=source.device)
        source_lengths = source_mask.sum(1)  # (B,)
        cache = None
        if use_cache:
            cache = self.backbone.new_cache(batch_size, num_source + num_tokens + 1, device=source.device, dtype=source.dtype)
        for step in range(num_tokens):
            if cache is None or step == 0:  # recompute everything (the reference), or prefill source + BOS
                ones = torch.ones_like(ids, dtype=torch.bool)
                hidden = self.run(source, source_mask, embed(ids), ones, cache=cache)[:, -1]
            else:
                token = embed(ids[:, -1:])  # (B, 1, D)
                keys_valid = torch.cat(
                    [source_mask, torch.ones(batch_size, step + 1, dtype=torch.bool, device=source.device)], dim=1
                )  # (B, Ns + step + 1)
                positions = (source_lengths + step)[:, None]  # (B, 1): target index `step` after the source
                hidden = self.backbone(token, mask=keys_valid[:, None, None, :], positions=positions, cache=cache)[:, -1]
            next_ids = sample_next(head(hidden), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            next_ids = next_ids.masked_fill(finished, pad_id)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if eos_id is not None:
                finished |= next_ids == eos_id
                if finished.all():
                    break
        return ids

    @torch.no_grad()
    def generate_text(
        self,
        modality: Modality,
        inputs: Tensor,
        mask: Tensor | None = None,
        *,
        max_new_tokens: int = 24,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Autoregressive text from a source modality, with a KV cache.

        Args:
            inputs: the source batch as the collator makes it (see ``Batch.inputs``); mask its mask.

        Returns:
            per item, the generated ids without BOS, cut at (and excluding) EOS.
        """
        source, source_mask = self.encode_source(modality, inputs, mask)
        ids = self._generate_tokens(
            source,
            source_mask,
            bos_id=self.text.bos_id,
            embed=self.embed_text_targets,
            head=self.lm_head,
            num_tokens=max_new_tokens,
            eos_id=self.text.eos_id,
            pad_id=self.text.pad_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            use_cache=use_cache,
            generator=generator,
        )
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[: row.index(self.text.eos_id)] if self.text.eos_id in row else row)
        return out

    @torch.no_grad()
    def generate_image_codes(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """VQ codes (B, h, w) for ``ids`` (B, L): the digits to draw, ``[bos] ... [eos]`` as
        ``Collator.source_texts`` makes them. Widths first, then one pass for every code; each
        code is the most likely one (temperature 0) or drawn as ``sample_next`` draws."""
        if self.image_tokenizer is None:
            raise ValueError(f"this model was not trained for text_to_image (its tasks: {', '.join(self.tasks)})")
        source, source_mask = self.encode_source(Modality.TEXT, ids, mask)
        widths = predicted_durations(self.width_head, self.backbone, source, source_mask)
        tokens = self.code_tokens(source, widths)
        hidden = self.run(source, source_mask, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        logits = self.code_head(hidden[:, source.shape[1] :]).float()  # (B, h * w, K)
        codes = sample_next(logits.flatten(0, 1), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        return codes.reshape(-1, *self.code_grid)

    @torch.no_grad()
    def generate_image(self, ids: Tensor, mask: Tensor | None = None, **sampling) -> Tensor:
        """Images (B, 1, H, W) in [-1, 1] for ``ids``, the digits to draw: codes, decoded by the VQ-VAE.
        ``sampling``: as ``generate_image_codes``."""
        codes = self.generate_image_codes(ids, mask, **sampling)
        return self.image_tokenizer.decode(codes).clamp(-1.0, 1.0)

    @torch.no_grad()
    def generate_audio(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Log-mel frames (B, F, num_mels), natural log of power as ``LogMel`` makes them, silence
        after each item's predicted end, for ``ids`` (B, L): the words to say, ``[bos] ... [eos]``
        as ``Collator.source_texts`` makes them. Durations first, then one pass for every frame."""
        if "text_to_audio" not in self.tasks:
            raise ValueError(f"this model was not trained for text_to_audio (its tasks: {', '.join(self.tasks)})")
        source, source_mask = self.encode_source(Modality.TEXT, ids, mask)
        durations = predicted_durations(self.duration_head, self.backbone, source, source_mask)  # (B, Ns) frames
        tokens, token_mask = self.frame_tokens(source, durations)
        hidden = self.run(source, source_mask, tokens, token_mask)
        frames = self.mel_head(hidden[:, source.shape[1] :])[:, : self.audio.num_frames].float()  # (B, F, M)
        log_mel = (frames * MEL_SCALE + MEL_CENTER).clamp(min=SILENCE)
        after_end = torch.arange(log_mel.shape[1], device=log_mel.device)[None, :] >= durations.sum(1, keepdim=True)
        return log_mel.masked_fill(after_end[:, :, None], SILENCE)


def _token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over (B, L, V) logits against (B, L) labels (-100 ignored) and token accuracy."""
    # fp32 island: log-softmax over the vocabulary under bf16 autocast loses precision.
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    with torch.no_grad():
        counted = labels != -100
        correct = (logits.argmax(-1) == labels) & counted
        accuracy = (correct.sum() / counted.sum().clamp(min=1)).item()
    return loss, {"token_acc": accuracy}


def _mask_of(batch: Batch, modality: Modality, keep: Tensor) -> Tensor | None:
    mask = batch.masks.get(modality)
    return None if mask is None else mask[keep]
