"""A feature cache for a fully frozen encoder: its output for each dataset item is computed once and
read back on later epochs, so the encoder runs only on items it has not seen.

A frozen pretrained encoder in eval mode is a fixed function of its input, so caching its output
is exact as long as the item's input is the same every epoch. That rules out augmentation upstream
of a cached encoder (the caller keeps the two apart). Entries are keyed by a dataset identity, the
item index, and the encoder's ``cache_identity()`` (its folder, layer and every setting that
changes its output): a different layer or a different dataset never reads another's features.
Each item's real tokens are stored (padding stripped) in memory, or with ``folder`` as one
safetensors file per item under a folder named by the key's digest, written atomically (a run
killed mid-write leaves no half file) and reused by later runs. Only ``forward``'s output is
cached, not ``forward_intermediates``.

Cached and freshly computed features are equal for encoders whose per-item output does not depend
on the rest of the batch: ``hf_image``, and ``hf_audio`` unless ``batch_padding=True`` (see its
padding handling). Otherwise an item keeps the features of the batch it was first seen in.

Reference: the safetensors format (Hugging Face, https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from polymodal.encoders.output import EncoderOutput

logger = logging.getLogger(__name__)

DIGEST_CHARS = 16  # of the key's sha256: 64 bits, no collision among any realistic number of caches
IDENTITY_FILE = "identity.txt"


class FeatureCache:
    """Wraps a frozen encoder: ``cache(indices, *inputs)`` returns what ``encoder(*inputs)`` would.

    Args:
        encoder: a fully frozen encoder (no parameter requires grad) with ``cache_identity()``.
        dataset: identifies the data the indices refer to (e.g. the manifest path and its split);
            the caller's to make unique.
        folder: where to keep the features across runs; None keeps them in memory for this run.
        dtype: storage dtype (bfloat16 halves the footprint of a float32 encoder's features).
    """

    def __init__(
        self, encoder: nn.Module, *, dataset: str, folder: str | Path | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"a feature cache needs a fully frozen encoder (freeze=frozen); {len(trainable)} parameters "
                f"train, e.g. {trainable[0]}"
            )
        if not hasattr(encoder, "cache_identity"):
            raise ValueError(f"{type(encoder).__name__} has no cache_identity(): nothing tells its outputs apart")
        self.encoder = encoder
        self.dtype = dtype
        self.identity = f"dataset={dataset}|{encoder.cache_identity()}"
        self.memory: dict[int, Tensor] = {}  # index -> (N_i, D) real tokens
        self.masked: bool | None = None  # whether the encoder's outputs carry a mask (learned on first use)
        self.hits = self.misses = 0
        self.folder = None
        if folder is not None:
            digest = hashlib.sha256(self.identity.encode()).hexdigest()[:DIGEST_CHARS]
            self.folder = Path(folder).expanduser() / digest
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / IDENTITY_FILE).write_text(self.identity + "\n")
            logger.info("feature cache for %s in %s", self.identity, self.folder)

    def _path(self, index: int) -> Path:
        return self.folder / f"{index}.safetensors"

    def _load(self, index: int) -> Tensor | None:
        if self.folder is None:
            return self.memory.get(index)
        path = self._path(index)
        if not path.is_file():
            return None
        stored = load_file(str(path))
        if self.masked is None:
            self.masked = bool(stored["masked"].item())
        return stored["tokens"]

    def _store(self, index: int, tokens: Tensor) -> None:
        tokens = tokens.detach().to("cpu", self.dtype).contiguous()
        if self.folder is None:
            self.memory[index] = tokens
            return
        path = self._path(index)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        save_file({"tokens": tokens, "masked": torch.tensor(bool(self.masked))}, str(partial))
        os.replace(partial, path)  # atomic: readers see the whole file or none

    def __call__(self, indices: Sequence[int], *inputs: Tensor | None) -> EncoderOutput:
        """The encoder's output for these items, computing only the ones not cached.

        Args:
            indices: (B,) the items' indices in ``dataset``.
            inputs: what ``encoder.forward`` takes, each with the batch first (a None passes through).

        Returns:
            EncoderOutput: tokens (B, N, D) padded with zeros to the longest item, in the storage
            dtype, on the inputs' device; mask (B, N), or None if the encoder gives none.
        """
        indices = [int(i) for i in indices]
        entries = [self._load(i) for i in indices]
        missing = [row for row, entry in enumerate(entries) if entry is None]
        self.hits += len(indices) - len(missing)
        self.misses += len(missing)
        if missing:
            for row, tokens in zip(missing, self._compute(missing, inputs)):
                self._store(indices[row], tokens)
                entries[row] = self._load(indices[row])
        device = next(x for x in inputs if x is not None).device
        lengths = torch.tensor([e.shape[0] for e in entries], device=device)  # (B,)
        tokens = nn.utils.rnn.pad_sequence(entries, batch_first=True).to(device)  # (B, N, D)
        mask = torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None] if self.masked else None
        return EncoderOutput(tokens, mask)

    def _compute(self, rows: list[int], inputs: Sequence[Tensor | None]) -> list[Tensor]:
        """Run the encoder on the uncached rows; each row's real tokens (N_i, D)."""
        some = next(x for x in inputs if x is not None)
        select = torch.tensor(rows, device=some.device)
        with torch.no_grad():
            out = self.encoder(*(None if x is None else x.index_select(0, select) for x in inputs))
        self.masked = out.mask is not None
        if out.mask is None:
            return list(out.tokens)
        return [tokens[keep] for tokens, keep in zip(out.tokens, out.mask)]
