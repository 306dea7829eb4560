"""Embed a manifest's items of one modality with a trained CLIP run and save them with their ids.

  polymodal embed runs/clip --manifest photos.jsonl --modality image --out index.safetensors

The towers of a CLIP model never read each other, so an index can be built once, offline, and
searched later from any other modality (`polymodal search`). The file holds "embeddings" (N, D)
float32 unit-norm and "ids" (N,) int64, each id the item's position among the manifest's usable
lines; its metadata holds the manifest-relative media paths (or the texts) as a JSON list under
"paths", and the modality, manifest and run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from polymodal.modality import Modality

logger = logging.getLogger(__name__)

EMBEDDINGS_KEY = "embeddings"
IDS_KEY = "ids"
PATHS_KEY = "paths"  # metadata: JSON list of str, one per id
MAX_BATCH_SIZE = 2**16  # beyond any memory; the data loader's own limit is sys.maxsize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a CLIP run folder written by `polymodal train --config clip`")
    parser.add_argument("--manifest", required=True, help="JSONL manifest, one item per line")
    parser.add_argument("--modality", required=True, choices=[m.value for m in Modality], help="which field to embed")
    parser.add_argument("--out", required=True, help="the index file to write (.safetensors)")
    parser.add_argument("--batch-size", type=int, default=64, help="items embedded at once (default: 64)")


def run(args: argparse.Namespace) -> int:
    from polymodal.errors import ConfigError
    from polymodal.training.run import load_run

    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"--batch-size must be in 1..{MAX_BATCH_SIZE}, got {args.batch_size}")
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give a file name such as {Path(args.out) / 'index.safetensors'}")
    run_dir = Path(args.run_dir)
    loaded = load_run(run_dir)
    modality = Modality.parse(args.modality)
    require_clip(loaded.model, run_dir, modality)
    index = embed_manifest(loaded, args.manifest, modality, batch_size=args.batch_size)
    save_index(args.out, index)
    print(f"embedded {len(index.ids)} {args.modality} items ({index.embeddings.shape[1]} dims) -> {args.out}")
    return 0


@dataclasses.dataclass(frozen=True)
class EmbeddingIndex:
    """Embeddings with their ids, as saved to and loaded from an index file.

    Attributes:
        embeddings: (N, D) float32, unit-norm rows.
        ids: (N,) int64, each item's position among the manifest's usable lines.
        paths: N strings: the manifest's media path (or the text) of each item.
        metadata: modality, manifest, run folder (str -> str).
    """

    embeddings: Tensor
    ids: Tensor
    paths: list[str]
    metadata: dict[str, str]

    def __post_init__(self) -> None:
        emb, ids = self.embeddings, self.ids
        if emb.ndim != 2 or ids.shape != emb.shape[:1] or len(self.paths) != ids.shape[0]:
            raise ValueError(f"embeddings {tuple(emb.shape)}, ids {tuple(ids.shape)} and {len(self.paths)} paths disagree")


def require_clip(model: Any, run_dir: Path, modality: Modality | None = None) -> None:
    """A ConfigError unless ``model`` is a CLIP model (with a tower for ``modality``, when given)."""
    from polymodal.errors import ConfigError
    from polymodal.models.clip import ClipModel

    if not isinstance(model, ClipModel):
        raise ConfigError(f"{run_dir} is not a CLIP run (model.architecture must be clip); embeddings need one")
    if modality is not None and modality not in model.modalities:
        towers = ", ".join(sorted(m.value for m in model.modalities))
        raise ConfigError(f"{run_dir} has no {modality} tower (its towers: {towers})")


@torch.no_grad()
def embed_manifest(
    run: Any, manifest: str | Path, modality: Modality, *, batch_size: int = 64, progress: bool | None = None
) -> EmbeddingIndex:
    """Embed every item of ``manifest`` that has ``modality``, in batches, with a progress bar.

    Args:
        run: a loaded ``polymodal.training.run.Run`` with a ``ClipModel``.
        manifest: JSONL path; media paths are relative to its folder.
        modality: the field to embed; items without it, or whose file fails to load, are skipped.
        progress: show a tqdm bar; None shows it only on a terminal.
    """
    from polymodal.data.manifest import ManifestDataset
    from polymodal.errors import DataError
    from polymodal.evaluation.zero_shot import embed_dataset

    dataset = ManifestDataset.from_config(manifest, run.config.data)
    wanted = [i for i, entry in enumerate(dataset.entries) if entry.get(modality.value) is not None]
    if not wanted:
        raise DataError(f"manifest {manifest} has no item with {modality!s}")
    device = next(run.model.parameters()).device
    embedded = embed_dataset(
        run.model, _ByLine(dataset, wanted), run.collator, [modality], batch_size=batch_size, device=device, progress=progress
    ).get(modality)  # media that fail to load are logged and skipped
    if embedded is None:
        raise DataError(f"no {modality} item of {manifest} could be loaded ({len(dataset.skipped)} skipped)")
    if dataset.skipped:
        logger.warning("skipped %d unreadable lines or files of %s", len(dataset.skipped), manifest)
    embeddings, ids = embedded
    metadata = {"modality": modality.value, "manifest": str(manifest), "run_dir": str(run.run_dir)}
    paths = [str(dataset.entries[i][modality.value]) for i in ids.tolist()]
    return EmbeddingIndex(embeddings, ids, paths, metadata)


class _ByLine(torch.utils.data.Dataset):
    """The manifest lines ``lines`` as samples labelled by their line's position, so an embedding
    keeps the id of the line it came from (a line that fails to load is None: skipped)."""

    def __init__(self, dataset, lines: list[int]) -> None:
        self.dataset, self.lines = dataset, lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int):
        sample = self.dataset[self.lines[i]]
        return None if sample is None else dataclasses.replace(sample, label=self.lines[i])


def save_index(path: str | Path, index: EmbeddingIndex) -> Path:
    """Write ``index`` as safetensors: tensors ``embeddings`` and ``ids``, the paths in metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from polymodal.errors import DataError

    path = Path(path)
    tensors = {EMBEDDINGS_KEY: index.embeddings.contiguous(), IDS_KEY: index.ids.contiguous()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={**index.metadata, PATHS_KEY: json.dumps(index.paths)})
    except (OSError, SafetensorError) as exc:  # a folder in the way, a full disk, a read-only folder
        raise DataError(f"cannot write the index {path}: {exc}") from None
    return path


def load_index(path: str | Path) -> EmbeddingIndex:
    """Read an index written by ``save_index``: through safetensors only, which holds tensors and
    strings and never runs code from the file (a pickle is not an index, whatever its name).

    Raises:
        DataError: naming the file, when it is missing, not a safetensors file, or not an index.
    """
    from safetensors import safe_open

    from polymodal.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"index file {path} does not exist; write one with `polymodal embed`")
    not_an_index = f"{path} is not an index written by `polymodal embed`"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            embeddings, ids = handle.get_tensor(EMBEDDINGS_KEY), handle.get_tensor(IDS_KEY)
        paths = json.loads(metadata.pop(PATHS_KEY, "[]"))
        if not isinstance(paths, list) or not embeddings.is_floating_point() or ids.is_floating_point():
            raise ValueError(f"{PATHS_KEY!r} is not a list, or the tensors have the wrong types")
        return EmbeddingIndex(embeddings, ids, [str(p) for p in paths], metadata)
    except Exception as exc:  # safetensors raises its own error types for a foreign or damaged file
        raise DataError(f"{not_an_index}: {exc}") from None
