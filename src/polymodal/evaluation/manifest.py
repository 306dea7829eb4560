"""Scoring any JSONL manifest with a trained run (``polymodal eval RUN --manifest m.jsonl``), with
a breakdown by any field of its lines (``--by speaker``).

What is scored, per item that carries a label or a caption:

- an any-to-any run: every X -> text task whose source the line has. The generated caption is right
  when it names the line's label: read back by the run's dataset (``DataSource.label_parser``: the
  built-in data reads "the number forty two" as 42) when it has a reader, else when it equals, as
  text, a caption the manifest gives that label. A line without a label must get its own caption.
- a run with contrastive embeddings and no X -> text task (a CLIP run): zero-shot classification
  of every non-text item against the label texts, as in CLIP (Radford et al. 2021,
  arXiv:2103.00020, section 3.1.4): each label's texts are the prompts the run's dataset names it
  with (``DataSource.prompt_sets``) or else the captions the manifest gives it; their unit
  embeddings are averaged into one class vector, and the nearest class is the answer. The
  candidates are the labels the manifest's lines carry.

Lines whose media fail to load are counted (``unreadable``) and left out of the figures; when
not one of a figure's lines loads, evaluation stops with the first failure named.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from polymodal.data.manifest import LABEL_KEY, ManifestDataset
from polymodal.errors import ConfigError, DataError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

EXAMPLES_KEPT = 8
MISSING = "(none)"  # the group of lines that lack a --by field


def evaluate_manifest(
    run: Any, manifest: str | Path, *, by: Sequence[str] = (), limit: int | None = None, batch_size: int = 64
) -> dict[str, dict]:
    """A loaded run's figures on every scorable line of ``manifest``.

    Args:
        run: a ``polymodal.training.run.Run``.
        manifest: JSONL; read at the run's image size and sample rate.
        by: fields of the lines to break each figure down by.
        limit: score at most the first ``limit`` lines.

    Returns:
        per task (``audio_to_text``) or zero-shot modality (``zero_shot_audio``): ``{"exact" or
        "accuracy", "count", "unreadable", "by": {field: {value: {figure, "count"}}}, "examples"}``.
    """
    dataset = ManifestDataset.from_config(manifest, run.config.data)
    run.collator.fit_speakers([dataset])  # data.speaker_norm: the manifest's speakers, from their own clips
    rows = range(len(dataset) if limit is None else min(limit, len(dataset)))
    model = run.model.eval()
    generation = {n: t for n, t in getattr(model, "generation_tasks", {}).items() if t.target is Modality.TEXT}
    results: dict[str, dict] = {}
    if generation:
        judge = caption_judge(dataset, run.source.label_parser)
        for name, task in generation.items():
            wanted = [i for i in rows if _scorable(dataset.entries[i], task.source)]
            if wanted:
                captions = generate_captions(run, dataset, wanted, task.source, batch_size=batch_size)
                _check_loaded(captions, dataset, wanted, manifest, name)
                right = {i: judge(i, text) for i, text in captions.items()}
                examples = [(_reference(dataset.entries[i]), captions[i]) for i in list(captions)[:EXAMPLES_KEPT]]
                results[name] = {**summarize(right, dataset, by, "exact", len(wanted)), "examples": examples}
    elif hasattr(model, "embed"):
        for modality in (m for m in _modalities(model) if m is not Modality.TEXT):
            wanted = [i for i in rows if dataset.entries[i].get(modality.value) is not None and _label(dataset.entries[i]) >= 0]
            if wanted:
                right = zero_shot_items(run, dataset, wanted, modality, batch_size=batch_size)
                _check_loaded(right, dataset, wanted, manifest, f"zero_shot_{modality}")
                results[f"zero_shot_{modality}"] = summarize(right, dataset, by, "accuracy", len(wanted))
    if not results:
        raise DataError(
            f"nothing in {manifest} can be scored by {run.run_dir}: its lines need a label or a caption and a "
            "source the run reads (an X -> text task, or contrastive embeddings)"
        )
    return results


def _check_loaded(scored: dict, dataset: ManifestDataset, wanted: Sequence[int], manifest: str | Path, name: str) -> None:
    """Stop when lines were asked for and not one loaded: a figure over no items says nothing.
    The error names the first of those lines' failed files."""
    if not scored:
        where, reason = next(filter(None, map(dataset.failure, wanted)), ("?", "?"))
        raise DataError(
            f"{manifest}: no line scored for {name} could be loaded ({dataset.num_skipped} skipped); "
            f"the first: {where}: {reason}"
        )


def _label(entry: dict) -> int:
    label = entry.get(LABEL_KEY, -1)
    return label if isinstance(label, int) else -1


def _scorable(entry: dict, source: Modality) -> bool:
    return entry.get(source.value) is not None and (_label(entry) >= 0 or isinstance(entry.get("text"), str))


def _reference(entry: dict) -> str:
    return entry["text"] if isinstance(entry.get("text"), str) else f"label {_label(entry)}"


def _modalities(model: Any) -> list[Modality]:
    return list(getattr(model, "modalities", None) or model.inputs.modalities)


def caption_judge(dataset: ManifestDataset, parse_label: Callable[[str], int | None] | None) -> Callable[[int, str], bool]:
    """``judge(index, generated) -> right``, as the module docstring says."""
    label_texts: dict[int, set[str]] = defaultdict(set)
    for entry in dataset.entries:
        if _label(entry) >= 0 and isinstance(entry.get("text"), str):
            label_texts[_label(entry)].add(entry["text"].strip())

    def judge(index: int, generated: str) -> bool:
        entry = dataset.entries[index]
        label = _label(entry)
        if label < 0:
            return generated.strip() == str(entry.get("text", "")).strip()
        if parse_label is not None:
            return parse_label(generated) == label
        return generated.strip() in label_texts[label]

    return judge


def _loaded(dataset: ManifestDataset, indices: Sequence[int], batch_size: int) -> Iterable[tuple[list[int], list]]:
    """Chunks of (indices, samples) with the lines whose media failed to load dropped."""
    for start in range(0, len(indices), batch_size):
        pairs = [(i, dataset[i]) for i in indices[start : start + batch_size]]
        pairs = [(i, s) for i, s in pairs if s is not None]
        if pairs:
            yield [i for i, _ in pairs], [s for _, s in pairs]


@torch.no_grad()
def generate_captions(run: Any, dataset: ManifestDataset, indices: Sequence[int], source: Modality, *, batch_size: int) -> dict[int, str]:
    """The run's greedy caption of each line's ``source`` input: {line index: text}; unreadable lines absent."""
    model = run.model
    device = next(model.parameters()).device
    out: dict[int, str] = {}
    for rows, samples in _loaded(dataset, indices, batch_size):
        batch = run.collator(samples).to(device)
        ids = model.generate(source, Modality.TEXT, batch.inputs[source], batch.masks.get(source), max_new_tokens=run.config.data.max_text_tokens)
        out.update({i: run.tokenizer.decode(row) for i, row in zip(rows, ids)})
    return out


@torch.no_grad()
def zero_shot_items(run: Any, dataset: ManifestDataset, indices: Sequence[int], modality: Modality, *, batch_size: int) -> dict[int, bool]:
    """Nearest label text of each line's ``modality`` input against its label: {line index: right}."""
    from polymodal.evaluation.zero_shot import embed_texts

    model = run.model
    device = next(model.parameters()).device
    labels = sorted({_label(dataset.entries[i]) for i in indices})
    texts = label_texts(run, dataset, modality, labels)
    text_emb = embed_texts(model, [t for label in labels for t in texts[label]], run.tokenizer, max_tokens=run.config.data.max_text_tokens, device=device)
    owner = torch.tensor([k for k, label in enumerate(labels) for _ in texts[label]])  # (P,) class of each prompt
    classes = torch.zeros(len(labels), text_emb.shape[1], dtype=torch.float64).index_add_(0, owner, text_emb.double())
    classes = torch.nn.functional.normalize(classes, dim=-1)  # (C, E): CLIP's prompt ensemble
    right: dict[int, bool] = {}
    for rows, samples in _loaded(dataset, indices, batch_size):
        batch = run.collator(samples).to(device)
        emb = model.embed(modality, batch.inputs[modality], batch.masks.get(modality)).double().cpu()  # (b, E)
        predicted = (emb @ classes.T).argmax(dim=1)  # (b,)
        right.update({i: labels[int(k)] == _label(dataset.entries[i]) for i, k in zip(rows, predicted)})
    return right


def label_texts(run: Any, dataset: ManifestDataset, modality: Modality, labels: Sequence[int]) -> dict[int, list[str]]:
    """Each label's texts: the run's dataset's prompts for it, else the manifest's captions of it."""
    prompts = run.source.prompt_sets(modality).get("")
    if prompts is not None:
        return {label: prompts(label) for label in labels}
    found: dict[int, list[str]] = defaultdict(list)
    for entry in dataset.entries:
        text = entry.get("text")
        if _label(entry) in labels and isinstance(text, str) and text.strip() not in found[_label(entry)]:
            found[_label(entry)].append(text.strip())
    nameless = [label for label in labels if not found[label]]
    if nameless:
        raise ConfigError(
            f"zero-shot needs a text for every label; labels {nameless[:5]} have no caption in the manifest "
            "and the run's dataset has no prompts for them"
        )
    return dict(found)


def summarize(right: dict[int, bool], dataset: ManifestDataset, by: Sequence[str], figure: str, asked: int) -> dict[str, Any]:
    """The share right overall and per value of each ``by`` field; ``unreadable``: asked but not loaded."""
    out: dict[str, Any] = {figure: _share(right.values()), "count": len(right), "unreadable": asked - len(right)}
    groups: dict[str, dict[str, list[bool]]] = {}
    for field in by:
        per_value: dict[str, list[bool]] = defaultdict(list)
        for i, ok in right.items():
            per_value[str(dataset.entries[i].get(field, MISSING))].append(ok)
        groups[field] = {value: {figure: _share(oks), "count": len(oks)} for value, oks in sorted(per_value.items())}
    if by:
        out["by"] = groups
    return out


def _share(values: Iterable[bool]) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def format_table(results: dict[str, dict]) -> list[str]:
    """Printable lines: one per figure, then one per group of each breakdown."""
    lines = []
    for name, result in results.items():
        figure = "exact" if "exact" in result else "accuracy"
        lines.append(f"{name:28s} {figure} {result[figure]:.4f}  ({result['count']} items, {result['unreadable']} unreadable)")
        for field, groups in result.get("by", {}).items():
            for value, group in groups.items():
                lines.append(f"  {field}={value:20s} {figure} {group[figure]:.4f}  ({group['count']} items)")
    return lines
