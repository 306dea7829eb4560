"""The text head: an LM head tied to the target-side token embedding, trained by next-token
cross-entropy after the source (teacher forcing), generating autoregressively with a KV cache.

Reference: the prefix-LM of Raffel et al. 2019, T5, arXiv:1910.10683 (section 3.2.1); tied input
and output embeddings, Press & Wolf 2016, arXiv:1608.05859; the KV cache of autoregressive
transformers, Pope et al. 2022, arXiv:2211.05102; label smoothing, Szegedy et al. 2016, Rethinking
the Inception Architecture, arXiv:1512.00567 (section 7): the target is 1 - eps on the true token
plus eps spread evenly over the vocabulary, which keeps a small model from becoming certain of a
caption it has memorised; beam search, the K likeliest prefixes kept at each step (Graves 2012,
Sequence Transduction with Recurrent Neural Networks, arXiv:1211.3711; Sutskever et al. 2014,
arXiv:1409.3215, section 3.2), scored by their summed log-probability without a length penalty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.decoders.sampling import sample_next
from polymodal.heads import HEADS, HeadOutput, HeadWiring, Targets
from polymodal.modality import Modality

EMBED_INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale
IGNORE_INDEX = -100  # F.cross_entropy's default: labels on padding


@HEADS.register("lm")
class LanguageModelHead(nn.Module):
    """Target token embedding + tied LM head over the tokenizer's vocabulary.

    Args:
        wiring: the vocabulary and special ids come from ``wiring.shapes.text``.
        label_smoothing: eps of the training loss's smoothed targets (0: plain cross-entropy).
        dropout: on the backbone's target states before the LM head, while training.
        num_beams: beams of deterministic decoding (temperature 0); 1 is greedy. A ``generate``
            call may give its own.
    """

    target = Modality.TEXT
    reads_references = False
    needs_image_tokenizer = False

    def __init__(self, wiring: HeadWiring, *, label_smoothing: float = 0.0, dropout: float = 0.0, num_beams: int = 1) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        if not (isinstance(num_beams, int) and num_beams >= 1):
            raise ValueError(f"num_beams must be an integer >= 1 (1: greedy), got {num_beams!r}")
        self.num_beams = num_beams
        self.label_smoothing = label_smoothing
        self.dropout = nn.Dropout(dropout)
        self.specials = wiring.shapes.text
        self.embed = nn.Embedding(self.specials.vocab_size, wiring.dim)
        self.lm_head = nn.Linear(wiring.dim, self.specials.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=EMBED_INIT_STD)

    def embed_targets(self, trunk, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, D) target tokens with the text type embedding."""
        tokens = self.embed(ids)
        return tokens + trunk.type_embedding(Modality.TEXT, tokens)

    def logits(self, trunk, source: Tensor, source_mask: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Teacher-forced logits (B, Lt, V) over the target positions; position t predicts token t + 1."""
        hidden = trunk.run(source, source_mask, self.embed_targets(trunk, ids), mask)
        return self.lm_head(hidden[:, source.shape[1] :])

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: Targets) -> HeadOutput:
        """Next-token cross-entropy over the caption ``[bos] ids [eos]`` (B, L) after the source."""
        ids, mask = target.values, target.mask
        hidden = trunk.run(source, source_mask, self.embed_targets(trunk, ids[:, :-1]), mask[:, :-1])
        logits = self.lm_head(self.dropout(hidden[:, source.shape[1] :]))  # (B, Lt - 1, V)
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        loss, metrics = token_loss(logits, labels, label_smoothing=self.label_smoothing)
        return HeadOutput(hidden, {"": loss}, metrics, counts={"": mask[:, 1:].sum()})

    @torch.no_grad()
    def generate(
        self,
        trunk,
        source: Tensor,
        source_mask: Tensor,
        *,
        max_new_tokens: int = 24,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        num_beams: int | None = None,
    ) -> list[list[int]]:
        """Autoregressive text after the source: per item, the ids after ``[bos]``, cut at (and
        without) ``[eos]``. At temperature 0 the likeliest text by beam search over ``num_beams``
        beams (default: the head's; 1 is greedy), else drawn as ``sample_next`` draws."""
        num_beams = self.num_beams if num_beams is None else num_beams
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if num_beams > 1 and temperature <= 0:
            return self.beam_search(trunk, source, source_mask, num_beams=num_beams, max_new_tokens=max_new_tokens, use_cache=use_cache)
        batch_size, num_source = source_mask.shape
        ids = torch.full((batch_size, 1), self.specials.bos_id, dtype=torch.long, device=source.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=source.device)
        cache = None
        if use_cache:
            cache = trunk.backbone.new_cache(batch_size, num_source + max_new_tokens + 1, device=source.device, dtype=source.dtype)
        for step in range(max_new_tokens):
            last = self.last_state(trunk, source, source_mask, ids, step, cache)
            next_ids = sample_next(self.lm_head(last), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            next_ids = next_ids.masked_fill(finished, self.specials.pad_id)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= next_ids == self.specials.eos_id
            if finished.all():
                break
        return self._cut(ids[:, 1:].tolist())

    def last_state(self, trunk, source: Tensor, source_mask: Tensor, ids: Tensor, step: int, cache) -> Tensor:
        """The backbone's state (B, D) at the last of the (B, step + 1) target ``ids``: the whole
        prefix-LM pass without a cache (the reference) or at step 0 (which fills the cache with
        source + [bos]), else the newest token alone, at target index ``step``, reading the cache."""
        if cache is None or step == 0:
            hidden = trunk.run(source, source_mask, self.embed_targets(trunk, ids), torch.ones_like(ids, dtype=torch.bool), cache=cache)
        else:
            hidden = cached_target_step(trunk, self.embed_targets(trunk, ids[:, -1:]), source_mask, step, cache)
        return hidden[:, -1]

    def _cut(self, rows: list[list[int]]) -> list[list[int]]:
        eos = self.specials.eos_id
        return [row[: row.index(eos)] if eos in row else row for row in rows]

    @torch.no_grad()
    def beam_search(
        self, trunk, source: Tensor, source_mask: Tensor, *, num_beams: int, max_new_tokens: int = 24, use_cache: bool = True
    ) -> list[list[int]]:
        """Per item, the text of highest summed log-probability (``[eos]`` included) among
        ``num_beams`` beams kept at every step; a text that has ended stays a beam, extended by
        padding at no cost. Beam search with as many beams as there are texts of up to
        ``max_new_tokens`` tokens is the exhaustive search."""
        batch_size, num_source = source_mask.shape
        k, device = num_beams, source.device
        pad, eos = self.specials.pad_id, self.specials.eos_id
        per_item = torch.arange(batch_size, device=device).repeat_interleave(k)  # (B * K,): each beam's item
        beam_source, beam_mask = source.index_select(0, per_item), source_mask.index_select(0, per_item)
        ids = torch.full((batch_size * k, 1), self.specials.bos_id, dtype=torch.long, device=device)
        scores = torch.full((batch_size, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live beam per item at the start: the K copies would tie
        finished = torch.zeros(batch_size * k, dtype=torch.bool, device=device)
        offsets = torch.arange(batch_size, device=device)[:, None] * k  # (B, 1): each item's first row
        # One cache row per item for the first pass, repeated per beam after it.
        cache = trunk.backbone.new_cache(batch_size, num_source + max_new_tokens + 1, device=device, dtype=source.dtype) if use_cache else None
        for step in range(max_new_tokens):
            if step == 0:  # source + [bos] once per item: its K beams start from the same state
                last = self.last_state(trunk, source, source_mask, ids[:batch_size], step, cache).index_select(0, per_item)
                if cache is not None:
                    cache.select(per_item)
            else:
                last = self.last_state(trunk, beam_source, beam_mask, ids, step, cache)
            # fp32 island: summed log-probabilities over many steps; bf16 would tie distinct texts.
            logp = self.lm_head(last).float().log_softmax(-1)  # (B * K, V)
            ended = torch.full_like(logp, float("-inf"))
            ended[:, pad] = 0.0
            logp = torch.where(finished[:, None], ended, logp)
            vocab = logp.shape[-1]
            scores, flat = (scores.reshape(-1, 1) + logp).reshape(batch_size, k * vocab).topk(k, dim=1)
            rows = (offsets + flat // vocab).reshape(-1)  # (B * K): the beam each survivor extends
            tokens = (flat % vocab).reshape(-1, 1)
            ids = torch.cat([ids[rows], tokens], dim=1)
            finished = finished[rows] | (tokens[:, 0] == eos)
            if cache is not None:
                cache.select(rows)
            if finished.all():
                break
        best = (offsets[:, 0] + scores.argmax(dim=1)).tolist()  # topk sorts, so this is each item's first beam
        return self._cut(ids[best, 1:].tolist())



def cached_target_step(trunk, token: Tensor, source_mask: Tensor, index: int, cache) -> Tensor:
    """One new target token (B, 1, D), at target index ``index`` after the source, through the
    backbone reading the KV cache of the source and the ``index`` target tokens before it: (B, 1, D).
    Its keys are the real source tokens and every target token so far; its position follows the
    source's real tokens, as in the prefix-LM pass that filled the cache."""
    batch_size = token.shape[0]
    keys_valid = torch.cat([source_mask, torch.ones(batch_size, index + 1, dtype=torch.bool, device=token.device)], dim=1)
    positions = (source_mask.sum(1) + index)[:, None]  # (B, 1)
    return trunk.step(token, mask=keys_valid[:, None, None, :], positions=positions, cache=cache)


def token_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy over (B, L, V) logits against (B, L) labels (-100 ignored), with targets smoothed
    by ``label_smoothing``, and token accuracy."""
    # fp32 island: log-softmax over the vocabulary under bf16 autocast loses precision.
    flat = logits.float().flatten(0, 1)  # (B * L, V)
    loss = F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    with torch.no_grad():
        counted = labels != IGNORE_INDEX
        correct = (logits.argmax(-1) == labels) & counted
        accuracy = (correct.sum() / counted.sum().clamp(min=1)).item()
    return loss, {"token_acc": accuracy}
