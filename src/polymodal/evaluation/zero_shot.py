"""Zero-shot classification with a contrastive model: embed prompts per class, pick the nearest.

A dataset that can name its labels in text (``DataSource.prompt_sets``) gives each class several
prompts ("the number forty two", "a handwritten 42"); the unit embeddings of its prompts are
averaged and re-normalised into one class vector (CLIP's prompt ensembling, section 3.1.4). An item
is classified as the class whose vector has the largest cosine with the item's embedding. No
classifier is trained: classes are named in text only, so labels never seen in training are
classified from their names alone, and are also scored apart.

Reference: Radford et al. 2021, Learning Transferable Visual Models From Natural Language
Supervision (CLIP), arXiv:2103.00020, sections 3.1.2-3.1.4.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from polymodal.data.text import TextTokenizer
from polymodal.distributed.process import world_size
from polymodal.evaluation.sharding import map_batches
from polymodal.evaluation.retrieval import retrieval_figures
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

NUM_TEXT_SPECIALS = 2  # <bos> and <eos> around every prompt, as the collator does
# A label -> the prompts that name it.
Prompts = Callable[[int], list[str]]
DEFAULT_TEXT_TOKENS = 24


def encode_texts(
    texts: Sequence[str], tokenizer: TextTokenizer, *, max_tokens: int = DEFAULT_TEXT_TOKENS
) -> tuple[Tensor, Tensor]:
    """Texts -> ``[bos] ids [eos]`` padded with pad, cut to ``max_tokens`` keeping ``<eos>`` last.

    Returns:
        ids (B, L) long and mask (B, L) bool, True on real tokens: what the collator makes.
    """
    keep = max_tokens - NUM_TEXT_SPECIALS
    rows = [[tokenizer.bos_id, *ids[:keep], tokenizer.eos_id] for ids in tokenizer.encode_batch(list(texts))]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)  # (B, L)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


@torch.no_grad()
def embed_texts(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: TextTokenizer,
    *,
    max_tokens: int = DEFAULT_TEXT_TOKENS,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(N, E) unit-norm text embeddings (``model.embed(Modality.TEXT, ...)``), on the CPU."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_texts(texts[start : start + batch_size], tokenizer, max_tokens=max_tokens)
        out.append(model.embed(Modality.TEXT, ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def class_embeddings(
    model: nn.Module,
    tokenizer: TextTokenizer,
    class_labels: Sequence[int],
    prompts: Prompts,
    *,
    max_tokens: int = DEFAULT_TEXT_TOKENS,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One vector per class: the re-normalised mean of its prompts' unit embeddings.

    Returns:
        (C, E) float32 unit-norm, row c for ``class_labels[c]``.
    """
    named = [prompts(label) for label in class_labels]
    per_class = {len(texts) for texts in named}
    if len(per_class) != 1:
        raise ValueError(f"every class needs as many prompts; got {sorted(per_class)}")
    emb = embed_texts(model, [p for texts in named for p in texts], tokenizer, max_tokens=max_tokens, device=device)  # (C * T, E)
    emb = emb.view(len(class_labels), per_class.pop(), -1).mean(dim=1)  # (C, T, E) -> (C, E)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    modalities: Iterable[Modality],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    progress: bool | None = False,
) -> dict[Modality, tuple[Tensor, Tensor]]:
    """Embed every item of ``dataset`` in each modality it carries; in a data-parallel run every
    rank embeds its share of the batches and returns them all (``evaluation/sharding.py``).

    Args:
        limit: only the first ``limit`` items of the dataset.
        progress: a tqdm bar over the batches; None shows it only on a terminal.

    Returns:
        per modality, ((N_m, E) float32 unit-norm embeddings, (N_m,) long labels), on the CPU.
        An unlabelled item (label -1) gets the label ``-(its index in the dataset + 2)``, so in
        retrieval it matches only its own other modalities.
    """
    modalities = list(modalities)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    was_training = model.training
    model.eval()

    def embed(batch: Any) -> tuple[Tensor, dict[Modality, tuple[Tensor, Tensor]]]:
        """(B,) labels, and per modality its (n, E) embeddings and (B,) presence, on the CPU."""
        on_device, out = batch.to(device), {}
        for modality in (m for m in modalities if m in batch.inputs and batch.size > 0):
            present = on_device.present[modality]  # (B,)
            mask = on_device.masks.get(modality)
            emb = model.embed(modality, on_device.inputs[modality][present], None if mask is None else mask[present])
            out[modality] = (emb.float().cpu(), present.cpu())
        return batch.labels.clone(), out

    with tqdm(total=-(-len(dataset) // batch_size), desc="embed", unit="batch", disable=None if progress is None else not progress) as bar:
        per_batch = map_batches(dataset, collate_fn, embed, batch_size=batch_size, on_round=lambda: bar.update(world_size()))
    model.train(was_training)
    found: dict[Modality, tuple[list[Tensor], list[Tensor]]] = {m: ([], []) for m in modalities}
    seen = 0  # items embedded before this batch
    for labels, out in per_batch:
        unlabelled = labels < 0
        labels[unlabelled] = -(seen + torch.nonzero(unlabelled).squeeze(1) + 2)  # a label of its own per item
        seen += len(labels)
        for modality, (emb, present) in out.items():
            found[modality][0].append(emb)
            found[modality][1].append(labels[present])
    return {m: (torch.cat(e), torch.cat(y)) for m, (e, y) in found.items() if e}


def zero_shot_from_embeddings(
    item_emb: Tensor,
    item_labels: Tensor,
    class_emb: Tensor,
    class_labels: Sequence[int],
    *,
    heldout_labels: Iterable[int] = frozenset(),
) -> dict[str, float]:
    """Nearest-class accuracy of precomputed embeddings.

    Args:
        item_emb: (N, E) unit-norm item embeddings; item_labels (N,).
        class_emb: (C, E) unit-norm class vectors, row c for ``class_labels[c]``.

    Returns:
        ``{"accuracy", "count", "num_classes"}`` plus ``heldout_accuracy`` and ``heldout_count``
        when some item's label is held out. Items whose label is not a class count as wrong.
    """
    scores = item_emb.to(torch.float64) @ class_emb.to(torch.float64).T  # (N, E) @ (E, C) -> (N, C)
    predicted = torch.as_tensor(list(class_labels), dtype=torch.long)[scores.argmax(dim=1)]  # (N,)
    right = predicted == item_labels.long()  # (N,)
    out: dict[str, float] = {
        "accuracy": right.double().mean().item() if len(right) else 0.0,
        "count": int(right.numel()),
        "num_classes": len(class_labels),
    }
    heldout = torch.as_tensor(sorted(set(heldout_labels)), dtype=torch.long)
    is_heldout = torch.isin(item_labels.long(), heldout)  # (N,)
    if is_heldout.any():
        out["heldout_accuracy"] = right[is_heldout].double().mean().item()
        out["heldout_count"] = int(is_heldout.sum())
    return out


def zero_shot_accuracy(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    tokenizer: TextTokenizer,
    modality: Modality,
    prompts: Prompts,
    *,
    class_labels: Sequence[int] | None = None,
    heldout_labels: Iterable[int] = frozenset(),
    max_text_tokens: int = DEFAULT_TEXT_TOKENS,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy of ``modality`` items against class prompts.

    Args:
        model: a ``ClipModel`` (anything with ``embed(modality, inputs, mask)``).
        prompts: a label -> the texts that name it (the same number of texts for every label).
        class_labels: the candidate classes; None: every label (>= 0) among the items scored.
        heldout_labels: labels never seen in training, also scored apart.
        max_text_tokens: prompt length cap, as ``data.max_text_tokens``.
        limit: score at most this many items.

    Returns:
        as ``zero_shot_from_embeddings``.
    """
    embedded = embed_dataset(model, dataset, collate_fn, [modality], batch_size=batch_size, device=device, limit=limit)
    if modality not in embedded:
        raise ValueError(f"no item of the dataset carries {modality}")
    item_emb, item_labels = embedded[modality]
    return score_embeddings(
        model, tokenizer, item_emb, item_labels, prompts, class_labels=class_labels, heldout_labels=heldout_labels,
        max_text_tokens=max_text_tokens, device=device,
    )  # fmt: skip


def score_embeddings(
    model: nn.Module,
    tokenizer: TextTokenizer,
    item_emb: Tensor,
    item_labels: Tensor,
    prompts: Prompts,
    *,
    class_labels: Sequence[int] | None = None,
    heldout_labels: Iterable[int] = frozenset(),
    max_text_tokens: int = DEFAULT_TEXT_TOKENS,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``zero_shot_from_embeddings`` of precomputed item embeddings, the class vectors made here."""
    if class_labels is None:
        class_labels = sorted({int(y) for y in item_labels.tolist() if y >= 0})
    if not class_labels:
        raise ValueError("zero-shot classification needs labelled items or class_labels")
    was_training = model.training
    model.eval()
    class_emb = class_embeddings(model, tokenizer, class_labels, prompts, max_tokens=max_text_tokens, device=device)
    model.train(was_training)
    return zero_shot_from_embeddings(item_emb, item_labels, class_emb, class_labels, heldout_labels=heldout_labels)


def clip_figures(run: Any, split: str = "test", limit: int | None = None) -> dict[str, dict[str, float]]:
    """A CLIP run's figures on a split: zero-shot per non-text modality, retrieval for every pair.

    Args:
        run: a loaded run (``polymodal.training.run.Run``) whose model is a ``ClipModel``.
        split: ``val`` or ``test``.
        limit: use at most this many items of the split.

    Returns:
        ``{"zero_shot_image": {"accuracy", "heldout_accuracy", "<set>_accuracy", ...}, ...,
        "retrieval_image_to_text": {"R@1", "R@5", "R@10", "count"}, ...}``; zero-shot needs a text
        tower and a dataset whose labels prompts can name (``DataSource.prompt_sets``), one figure
        per prompt set.
    """
    model = run.model
    device = next(model.parameters()).device
    embedded = embed_dataset(model, getattr(run.splits, split), run.collator, model.modalities, device=device, limit=limit)
    figures: dict[str, dict[str, float]] = {}
    for modality, (emb, labels) in embedded.items():
        prompt_sets = run.source.prompt_sets(modality)
        if modality is Modality.TEXT or Modality.TEXT not in embedded or not prompt_sets or not (labels >= 0).any():
            continue
        common = dict(heldout_labels=run.splits.heldout_labels, max_text_tokens=run.config.data.max_text_tokens, device=device)
        for name, prompts in prompt_sets.items():
            result = score_embeddings(model, run.tokenizer, emb, labels, prompts, **common)
            if not name:
                figures[f"zero_shot_{modality}"] = result
            else:  # the same classes named by another set (e.g. phrasings training never showed)
                figures[f"zero_shot_{modality}"][f"{name}_accuracy"] = result["accuracy"]
    for name, recall in retrieval_figures(embedded).items():
        figures[f"retrieval_{name}"] = recall
    return figures
