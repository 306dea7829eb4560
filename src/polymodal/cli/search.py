"""Search an index written by `polymodal embed` with a text, an image or an audio query.

  polymodal search runs/clip index.safetensors --text "seven hundred"
  polymodal search runs/clip index.safetensors --image query.png --top-k 10

Prints the top-k ids, cosine scores and paths, best first. The query may be of any modality the
run has a tower for, whatever the modality of the index.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from polymodal.modality import Modality


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the CLIP run folder the index was embedded with")
    parser.add_argument("index", help="an index file written by `polymodal embed`")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image file as the query")
    query.add_argument("--audio", help="an audio file (WAV, FLAC, OGG) as the query")
    parser.add_argument("--top-k", type=int, default=5, help="how many results (default: 5)")


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: the item's id in the index, its cosine score and its path (or text)."""

    id: int
    score: float
    path: str


def run(args: argparse.Namespace) -> int:
    from polymodal.cli.embed import load_index, require_clip
    from polymodal.errors import ConfigError
    from polymodal.training.run import load_run

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    index = load_index(args.index)  # before the run, so a wrong index path fails fast
    run_dir = Path(args.run_dir)
    loaded = load_run(run_dir)
    modality, query = next((m, getattr(args, m.value)) for m in Modality if getattr(args, m.value) is not None)
    require_clip(loaded.model, run_dir, modality)
    hits = search_index(loaded, index, modality, query, top_k=args.top_k)
    what = index.metadata.get("modality", "indexed")
    print(f"top {len(hits)} of {len(index.ids)} {what} items for {modality} {query!r}:")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:3d}  id {hit.id:6d}  score {hit.score:.4f}  {hit.path}")
    return 0


@torch.no_grad()
def embed_query(run: Any, modality: Modality, query: str) -> torch.Tensor:
    """(D,) unit-norm embedding of a text, or of the image/audio file at path ``query``.

    The query goes through the run's collator, so it is prepared exactly as training data was.
    """
    from polymodal.data.collate import collate_query

    model = run.model.eval()
    batch = collate_query(run.collator, run.config.data, modality, query).to(next(model.parameters()).device)
    return model.embed(modality, batch.inputs[modality], batch.masks.get(modality))[0].float().cpu()


def search_index(run: Any, index: Any, modality: Modality, query: str, *, top_k: int = 5) -> list[Hit]:
    """The ``top_k`` items of ``index`` most similar (cosine) to the query, best first.

    Args:
        run: a loaded ``polymodal.training.run.Run`` with a ``ClipModel``.
        index: an ``EmbeddingIndex`` (``polymodal.cli.embed.load_index``).
        modality: the query's modality; ``query`` is the text, or a file path for image/audio.
    """
    from polymodal.errors import DataError

    vector = embed_query(run, modality, query)  # (D,)
    if index.embeddings.shape[1] != vector.shape[0]:
        raise DataError(
            f"the index holds {index.embeddings.shape[1]}-dim embeddings but this run makes {vector.shape[0]}-dim "
            f"ones; embed it with the same run (it was made by {index.metadata.get('run_dir', 'another run')})"
        )
    scores = index.embeddings.to(torch.float64) @ vector.to(torch.float64)  # (N, D) @ (D,) -> (N,)
    top = scores.topk(min(top_k, scores.shape[0]))
    return [
        Hit(int(index.ids[i]), float(s), index.paths[i] if i < len(index.paths) else "")
        for s, i in zip(top.values.tolist(), top.indices.tolist())
    ]
