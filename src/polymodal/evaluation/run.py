"""A run's figures on a split, by architecture (``models.architectures`` picks the evaluator), and
``eval.json``.

Any-to-any: X -> text exact match for every captioning task, retrieval R@K for every pair (with
``contrastive``), the image tokenizer's reconstruction figures and, when asked, samples generated
from the split's captions with figures that need no judge (``evaluation/generation.py``: Fréchet
distances, variety), judged by the dataset's own evaluators where it has them, and written to
``samples/``.
CLIP: zero-shot accuracy and retrieval. Image tokenizer: reconstruction quality and code usage.

In a data-parallel run every rank calls the evaluator: captioning, embedding and reconstruction are
shared out by batches (``evaluation/sharding.py``) and every rank returns the figures of the whole
split, those of one process; generated samples, their figures and judges come from rank 0 alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from polymodal.config import Config, to_dict
from polymodal.distributed.process import is_main
from polymodal.evaluation.captioning import caption_accuracy
from polymodal.evaluation.generation import generation_figures
from polymodal.evaluation.reconstruction import image_grid, reconstruction_figures, save_png
from polymodal.evaluation.retrieval import retrieval_figures
from polymodal.evaluation.samples import generate_from_captions, write_samples
from polymodal.evaluation.zero_shot import clip_figures, embed_dataset
from polymodal.modality import Modality

EVAL_FILE = "eval.json"
RECONSTRUCTION_FILE = "reconstructions.png"
SAMPLES_DIR = "samples"
VARIETY_REPEATS = 8  # samples of one caption for the variety figures


def evaluate_run(run: Any, *, split: str = "test", limit: int | None = None, generate: bool = True) -> dict:
    """The figures of a loaded run (``training.run.Run``) on ``split`` (val | test), at most
    ``limit`` items per figure; ``generate`` also makes and judges samples (any-to-any)."""
    from polymodal.models.architectures import ARCHITECTURES

    return ARCHITECTURES.get(run.config.model.architecture).evaluate(run, split=split, limit=limit, generate=generate)


def evaluate_any_to_any(run: Any, *, split: str, limit: int | None, generate: bool) -> dict:
    model, dataset = run.model, getattr(run.splits, split)
    device = next(model.parameters()).device
    results: dict = {}
    for name, task in model.generation_tasks.items():
        if task.target is Modality.TEXT:
            results[name] = caption_accuracy(
                model, dataset, run.collator, run.tokenizer, task.source, heldout_labels=run.splits.heldout_labels,
                parse_label=run.source.label_parser, max_new_tokens=run.config.data.max_text_tokens, device=device, limit=limit,
            )  # fmt: skip
    if model.contrastive is not None:
        embedded = embed_dataset(model, dataset, run.collator, model.contrastive.modalities, device=device, limit=limit)
        results.update({f"retrieval_{name}": recall for name, recall in retrieval_figures(embedded).items()})
    tasks = {name: t.target for name, t in model.generation_tasks.items() if t.source is Modality.TEXT and t.target is not Modality.TEXT}
    if generate and tasks:
        # Reconstruction is shared out, so every rank takes part (rank 0 alone would wait for the others forever).
        tokenizer_figures = None
        if model.image_tokenizer is not None:
            tokenizer_figures, _ = reconstruction_figures(model.image_tokenizer, dataset, run.collator, device=device)
        if is_main():  # sampling and judging are not shared out: rank 0 alone
            results.update(_generation_figures(run, dataset, tasks, tokenizer_figures, limit=limit, device=device))
    return results


def _generation_figures(
    run: Any, dataset, tasks: dict[str, Modality], tokenizer_figures: dict | None, *, limit: int | None, device: torch.device
) -> dict:
    """Samples from the split's captions for every text -> X task in ``tasks`` (name: target),
    their figures that need no judge (``evaluation.generation``), the image tokenizer's figures
    (``tokenizer_figures``, when it has one) and the dataset's judgement of them all; the first
    samples go to ``samples/``."""
    generated = {
        name: generate_from_captions(run, dataset, target, limit=limit, device=device, repeats=VARIETY_REPEATS)
        for name, target in tasks.items()
    }  # fmt: skip
    results: dict = {name: generation_figures(run, tasks[name], samples, device=device) for name, samples in generated.items()}
    if tokenizer_figures is not None:
        results["image_tokenizer"] = tokenizer_figures
    for section, figures in run.source.evaluate_generation(run, dataset, generated, limit=limit).items():
        results.setdefault(section, {}).update(figures)
    by_target = {tasks[name]: samples for name, samples in generated.items()}
    write_samples(run.run_dir / SAMPLES_DIR, by_target, sample_rate=run.config.data.sample_rate)
    return results


def evaluate_clip(run: Any, *, split: str, limit: int | None, generate: bool) -> dict:
    return clip_figures(run, split=split, limit=limit)


def evaluate_image_tokenizer(run: Any, *, split: str, limit: int | None, generate: bool) -> dict:
    dataset = getattr(run.splits, split)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = next(run.model.parameters()).device
    figures, preview = reconstruction_figures(run.model.tokenizer, dataset, run.collator, device=device)
    if is_main():
        save_png(image_grid(preview), run.run_dir / RECONSTRUCTION_FILE)
    return {"reconstruction": figures}


def flat_figures(results: dict) -> dict[str, float]:
    """``{"image_to_text": {"exact": .9}}`` -> ``{"image_to_text/exact": .9}`` (numbers only)."""
    return {
        f"{task}/{key}": float(value)
        for task, figures in results.items()
        for key, value in figures.items()
        if isinstance(value, (int, float))
    }


# What training alone knows and a later `polymodal eval` keeps: its throughput and the selected step.
TRAINING_RECORDS = ("train", "selected")


def write_eval(run_dir: Path, figures: dict, config: Config) -> Path:
    """``eval.json``: the figures and the config; a re-evaluation keeps the training records of the
    file it replaces (``TRAINING_RECORDS``)."""
    path = Path(run_dir) / EVAL_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text()).get("figures", {})
        except (json.JSONDecodeError, AttributeError):
            before = {}  # a damaged file is replaced whole
        figures = {**{k: before[k] for k in TRAINING_RECORDS if k in before and k not in figures}, **figures}
    path.write_text(json.dumps({"figures": figures, "config": to_dict(config)}, indent=2))
    return path
