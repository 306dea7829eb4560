"""The any-to-any model: per-modality encoders and projectors, a modality-type embedding, ONE shared
transformer over source and target tokens in a prefix-LM layout, and an LM head for text.

Reference: seed 000 (modality encoders + shared backbone + modality decoders); the prefix-LM layout
of Raffel et al. 2019, T5, arXiv:1910.10683 (section 3.2.1); LLaVA-style projection of encoder
tokens into the backbone width, Liu et al. 2023, arXiv:2304.08485.

One sequence per task and item:  [source tokens] [BOS text tokens ...]
bidirectional over the source, causal over the target, sources never see targets.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.data.batch import Batch
from polymodal.decoders.sampling import sample_next
from polymodal.modality import Modality
from polymodal.models.masks import prefix_lm_mask
from polymodal.models.output import StepOutput

# Task name -> (source modality, target modality). Text targets go through the LM head.
TASKS: dict[str, tuple[Modality, Modality]] = {
    "image_to_text": (Modality.IMAGE, Modality.TEXT),
    "audio_to_text": (Modality.AUDIO, Modality.TEXT),
}

# Modality-type embedding rows, fixed so checkpoints stay loadable when modalities are added.
MODALITY_INDEX = {m: i for i, m in enumerate(Modality)}


@dataclasses.dataclass(frozen=True)
class TextSpecials:
    """Token ids the LM needs from the tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int


class AnyToAnyModel(nn.Module):
    """Wiring only: takes built parts (see ``polymodal.models.build``)."""

    def __init__(
        self,
        *,
        encoders: dict[Modality, nn.Module],
        projectors: dict[Modality, nn.Module],
        backbone: nn.Module,
        dim: int,
        text: TextSpecials,
        tasks: list[str],
    ) -> None:
        super().__init__()
        for task in tasks:
            source, _ = TASKS[task]
            if source not in encoders:
                raise ValueError(f"task {task} needs a {source} encoder")
        self.encoders = nn.ModuleDict({m.value: e for m, e in encoders.items()})
        self.projectors = nn.ModuleDict({m.value: p for m, p in projectors.items()})
        self.backbone = backbone
        self.modality_embed = nn.Embedding(len(MODALITY_INDEX), dim)
        self.text_embed = nn.Embedding(text.vocab_size, dim)  # target-side text tokens
        self.lm_head = nn.Linear(dim, text.vocab_size, bias=False)
        self.lm_head.weight = self.text_embed.weight  # tied (Press & Wolf 2016, arXiv:1608.05859)
        self.text = text
        self.tasks = list(tasks)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        nn.init.normal_(self.text_embed.weight, std=0.02)

    # ------------------------------------------------------------------ encoding

    def type_embedding(self, modality: Modality, like: Tensor) -> Tensor:
        index = torch.tensor(MODALITY_INDEX[modality], device=like.device)
        return self.modality_embed(index).to(like.dtype)  # (D,)

    def encode_source(self, modality: Modality, inputs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Encoder -> projector -> + modality-type embedding.

        Returns:
            tokens (B, N, D) and mask (B, N) bool (True on real tokens).
        """
        encoder = self.encoders[modality.value]
        out = encoder(inputs) if mask is None or modality is Modality.IMAGE else encoder(inputs, mask)
        tokens = self.projectors[modality.value](out.tokens, out.mask)
        tokens = tokens + self.type_embedding(modality, tokens)
        if out.mask is not None and tokens.shape[1] == out.tokens.shape[1]:
            return tokens, out.mask  # a per-token projector keeps the padding
        # No padding, or learned queries that already read only the real tokens.
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def embed_text_targets(self, ids: Tensor) -> Tensor:
        tokens = self.text_embed(ids)  # (B, L, D)
        return tokens + self.type_embedding(Modality.TEXT, tokens)

    # ------------------------------------------------------------------ training

    def text_logits(
        self, source: Tensor, source_mask: Tensor, target_ids: Tensor, target_mask: Tensor, *, cache=None
    ) -> Tensor:
        """Teacher-forced LM logits over the target positions.

        Args:
            source: (B, Ns, D) projected source tokens; source_mask (B, Ns).
            target_ids: (B, Lt) ids starting with BOS; target_mask (B, Lt).
            cache: a backbone KV cache to fill (generation prefill), or None.

        Returns:
            (B, Lt, V) logits; position t predicts target token t + 1.
        """
        target = self.embed_text_targets(target_ids)
        tokens = torch.cat([source, target], dim=1)  # (B, Ns + Lt, D)
        valid = torch.cat([source_mask, target_mask], dim=1)
        is_target = torch.zeros_like(valid)
        is_target[:, source.shape[1] :] = True
        # Positions count real tokens only, so padding a batch does not shift anyone's RoPE phases.
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(tokens, mask=prefix_lm_mask(is_target, valid), positions=positions, cache=cache)
        return self.lm_head(hidden[:, source.shape[1] :])

    def forward(self, batch: Batch) -> StepOutput:
        losses: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        for task in self.tasks:
            source_modality, _ = TASKS[task]
            if source_modality not in batch.inputs or Modality.TEXT not in batch.inputs:
                continue
            keep = batch.present[source_modality] & batch.present[Modality.TEXT]
            if not keep.any():
                continue
            source, source_mask = self.encode_source(
                source_modality, batch.inputs[source_modality][keep], _mask_of(batch, source_modality, keep)
            )
            ids = batch.inputs[Modality.TEXT][keep]
            text_mask = batch.masks[Modality.TEXT][keep]
            logits = self.text_logits(source, source_mask, ids[:, :-1], text_mask[:, :-1])
            labels = ids[:, 1:].masked_fill(~text_mask[:, 1:], -100)  # -100: ignored by cross_entropy
            # fp32 island: log-softmax over the vocabulary under bf16 autocast loses precision.
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            losses[task] = loss
            with torch.no_grad():
                counted = labels != -100
                correct = (logits.argmax(-1) == labels) & counted
                metrics[f"{task}_token_acc"] = (correct.sum() / counted.sum().clamp(min=1)).item()
        if not losses:
            raise ValueError(f"the batch has none of the inputs the tasks {self.tasks} need (has {list(batch.inputs)})")
        return StepOutput(losses, metrics)

    # ------------------------------------------------------------------ generation

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
        batch_size, num_source = source_mask.shape
        ids = torch.full((batch_size, 1), self.text.bos_id, dtype=torch.long, device=source.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=source.device)
        source_lengths = source_mask.sum(1)  # (B,)
        cache = None
        if use_cache:
            cache = self.backbone.new_cache(
                batch_size, num_source + max_new_tokens + 1, device=source.device, dtype=source.dtype
            )
        for step in range(max_new_tokens):
            if cache is None:  # recompute everything: the reference the cached path is tested against
                next_logits = self.text_logits(source, source_mask, ids, torch.ones_like(ids, dtype=torch.bool))[:, -1]
            elif step == 0:  # prefill the cache with source + BOS
                ones = torch.ones_like(ids, dtype=torch.bool)
                next_logits = self.text_logits(source, source_mask, ids, ones, cache=cache)[:, -1]
            else:
                token = self.embed_text_targets(ids[:, -1:])  # (B, 1, D)
                keys_valid = torch.cat(
                    [source_mask, torch.ones(batch_size, step + 1, dtype=torch.bool, device=source.device)], dim=1
                )  # (B, Ns + step + 1)
                positions = (source_lengths + step)[:, None]  # (B, 1): target index `step` after the source
                hidden = self.backbone(token, mask=keys_valid[:, None, None, :], positions=positions, cache=cache)
                next_logits = self.lm_head(hidden[:, -1])
            next_ids = sample_next(next_logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            next_ids = next_ids.masked_fill(finished, self.text.pad_id)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == self.text.eos_id
            if finished.all():
                break
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[: row.index(self.text.eos_id)] if self.text.eos_id in row else row)
        return out


def _mask_of(batch: Batch, modality: Modality, keep: Tensor) -> Tensor | None:
    mask = batch.masks.get(modality)
    return None if mask is None else mask[keep]
