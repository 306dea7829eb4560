"""Helpers for the data-parallel tests: run a function as W ranks of a gloo group on this machine
(``torch.multiprocessing`` spawn, one thread each), and the small runs the equivalence tests train
in W processes and in one (a synthetic dataset of fixed-length items, so every rank holds the same
number of target tokens and a per-rank token mean averages to the global one).

Functions run as ranks live here, not in the test files: spawned processes import them by module
name, which pytest's importlib mode does not give test files.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.multiprocessing as mp
from batches import SHAPES, TEXT_LEN
from torch import nn
from torch.utils.data import Dataset

from polymodal.config import Config, load_config
from polymodal.data.batch import Batch
from polymodal.distributed.collectives import mean_over_ranks
from polymodal.distributed.contrastive import gathered_info_nce
from polymodal.distributed.fsdp import export_whole, is_sharded
from polymodal.distributed.process import process_group, rank
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.training.checkpoint import MODEL_FILE
from polymodal.training.loop import fit

NUM_ITEMS = 96
NUM_LABELS = 12  # fewer labels than a batch: unique_labels drops repeats, across ranks too
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")):
        fn(*args)


def run_ranks(fn: Callable[..., None], world: int, *args: Any, timeout: float | None = None) -> None:
    """``fn(*args)`` in each of ``world`` processes joined in one gloo group; raises if one fails,
    or (``timeout`` in seconds) if they have not all finished by then: a collective that some rank
    never reaches waits forever, and a test should fail instead."""
    ranks = mp.spawn(_rank_main, args=(world, free_port(), fn, args), nprocs=world, join=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ranks.join(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0)):
        if deadline is not None and time.monotonic() >= deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError(f"{world} ranks of {fn.__name__} still running after {timeout} s: one waits in a collective?")


class Items(Dataset):
    """Seeded items of every modality, all of one length (text, audio frames), or with ``ragged``
    captions of 3 to TEXT_LEN tokens (then ranks hold different numbers of target tokens)."""

    def __init__(self, *, ragged: bool = False) -> None:
        g = torch.Generator().manual_seed(11)
        height, width = SHAPES.image_size
        self.images = torch.rand(NUM_ITEMS, 1, height, width, generator=g) * 2 - 1
        self.ids = torch.randint(3, SHAPES.text.vocab_size, (NUM_ITEMS, TEXT_LEN), generator=g)
        self.ids[:, 0], self.ids[:, -1] = SHAPES.text.bos_id, SHAPES.text.eos_id
        self.audio = torch.randn(NUM_ITEMS, SHAPES.num_audio_frames, SHAPES.num_mels, generator=g)
        self.labels = torch.randint(NUM_LABELS, (NUM_ITEMS,), generator=g)
        lengths = torch.randint(3, TEXT_LEN + 1, (NUM_ITEMS,), generator=g) if ragged else torch.full((NUM_ITEMS,), TEXT_LEN)
        self.text_mask = torch.arange(TEXT_LEN) < lengths[:, None]  # (NUM_ITEMS, TEXT_LEN)
        self.ids[torch.arange(NUM_ITEMS), lengths - 1] = SHAPES.text.eos_id
        self.ids[~self.text_mask] = SHAPES.text.pad_id

    def __len__(self) -> int:
        return NUM_ITEMS

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]) -> Batch:
        rows_t = torch.tensor(rows)
        every = torch.ones(len(rows), dtype=torch.bool)
        return Batch(
            inputs={Modality.IMAGE: self.images[rows_t], Modality.TEXT: self.ids[rows_t], Modality.AUDIO: self.audio[rows_t]},
            masks={Modality.TEXT: self.text_mask[rows_t],
                   Modality.AUDIO: torch.ones(len(rows), SHAPES.num_audio_frames, dtype=torch.bool)},
            present={m: every.clone() for m in Modality},
            labels=self.labels[rows_t],
        )  # fmt: skip


# Per run kind, the config overrides: small, fp32, no dropout, the run's own seed.
RUNS = {
    "contrastive": ["model.tasks=[image_to_text,audio_to_text,contrastive]"],
    "moe": ["model.tasks=[image_to_text,contrastive]", "model.backbone.moe={layers: [1], capacity_factor: null}"],
    "vqvae": ["model.architecture=image_tokenizer"],
    "fsdp": ["model.tasks=[image_to_text,audio_to_text,contrastive]", "train.fsdp=true"],
    "ragged": ["model.tasks=[image_to_text,audio_to_text,contrastive]"],
    "pcgrad": ["model.tasks=[image_to_text,audio_to_text,contrastive]", "train.gradient_surgery={name: pcgrad}"],
    "gradnorm": ["model.tasks=[image_to_text,audio_to_text,contrastive]", "train.gradient_surgery={name: gradnorm}"],
    "gradnorm_layer": ["model.tasks=[image_to_text,audio_to_text,contrastive]",
                       "train.gradient_surgery={name: gradnorm, layer: backbone.final_norm}"],
}


def build_run(kind: str, batch_size: int, steps: int, *extra: str) -> tuple[Config, nn.Module]:
    """The ``kind`` run's config and its model as initialised. The learning rate is small because
    Adam's first update is ``lr * g / (|g| + eps)``: for a gradient entry near eps (1e-8) the
    float32 rounding of sums taken in another order (two ranks, or one batch) is a few percent of
    g, and so of lr in the update (4% of lr measured). At lr 1e-4 that stays under the tests' 1e-5,
    while training moves weights by up to 5e-4."""
    overrides = [*RUNS[kind], f"train.batch_size={batch_size}", f"train.steps={steps}", "train.lr=0.0001",
                 "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=5", "train.progress=false",
                 "train.prefetch=0", "train.precision=fp32", "device=cpu", "seed=3", *extra]  # fmt: skip
    config = load_config(["tiny"], overrides)
    torch.manual_seed(config.seed)
    return config, build_model(config, SHAPES)


def train_run(
    kind: str, run_dir: Path, batch_size: int, steps: int, *extra: str, resume: bool = False, delay: float = 0.0
) -> None:
    """Fit the ``kind`` run into ``run_dir`` (as one rank when called in a group); every rank then
    writes its weights to ``rank{r}.safetensors``. ``delay`` seconds per batch slow the data only."""
    config, model = build_run(kind, batch_size, steps, *extra)
    data = Items(ragged=kind == "ragged")

    def collate(rows: list[int]) -> Batch:
        time.sleep(delay)
        return data.collate(rows)

    fit(model, data, collate, config, run_dir, resume=resume)
    if is_sharded(model):  # the whole model, gathered as the end of a run does
        export_whole(model, Path(run_dir))
        os.replace(Path(run_dir) / MODEL_FILE, Path(run_dir) / f"rank{rank()}.safetensors") if rank() == 0 else None
        return
    safetensors.torch.save_model(model, str(Path(run_dir) / f"rank{rank()}.safetensors"))  # every rank's weights


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def gathered_contrastive(splits: list[int], unique_labels: bool, tile_size: int | None, out: Path) -> None:
    """This rank's share of the InfoNCE over seeded (N, E) pairs split ``splits`` rows per rank, with
    its gradients as DDP would leave them (the local rows', and the logit scale's averaged)."""
    a, b, labels, scale = contrastive_inputs(sum(splits))
    start, stop = sum(splits[: rank()]), sum(splits[: rank() + 1])
    local_a, local_b = a[start:stop].detach().requires_grad_(), b[start:stop].detach().requires_grad_()
    loss = gathered_info_nce(local_a, local_b, labels[start:stop], scale, unique_labels=unique_labels, tile_size=tile_size,
                             tiled_above=None)  # fmt: skip
    loss.backward()
    world = len(splits)
    scale_grad = mean_over_ranks(scale.grad)  # what DDP does to a parameter's gradient
    torch.save({"loss": loss.detach(), "grad_a": local_a.grad / world, "grad_b": local_b.grad / world,
                "grad_scale": scale_grad}, out / f"rank{rank()}.pt")  # fmt: skip


def contrastive_inputs(num: int) -> tuple[torch.Tensor, ...]:
    """Seeded unit-norm (num, 8) pairs in float64, labels with repeats, and a scale needing a gradient."""
    g = torch.Generator().manual_seed(num)
    a = torch.nn.functional.normalize(torch.randn(num, 8, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(num, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(-1, num // 2, (num,), generator=g)
    return a, b, labels, torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
