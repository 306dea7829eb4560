"""The flow image head's DiT alone on the built-in images: does it draw digits, and what makes it?

Claim (BENCHMARKS.md, "The DiT alone draws strokes, not patches, with a convolution in its MLP"):
trained on the ``metaquery`` preset's data, conditioned not by the queries but by one learned
embedding per digit slot (3 tokens: hundreds, tens, units, 11 values each), DiT's plain MLP draws
patch-sized fragments however long it trains, and a depthwise convolution over the patch grid in
each MLP (``decoder.conv_kernel``) turns them into strokes. For each setting it prints, at each
evaluation step, the flow-matching loss at fixed times on 128 test images with their own and the
empty condition, and the share of 256 test captions whose number the built-in image judge reads
in the samples (Heun, ``--sample-steps`` steps, guidance 1 and 2), and writes a PNG of 32 samples.

    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --steps 1000 --out OUT             # DiT as shipped before
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --steps 1000 --conv-kernel 3 --out OUT
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --steps 1000 --conv-kernel 3 --time-shift 3 --out OUT

Claim (BENCHMARKS.md, "Pixels or latents for the flow DiT"): on the latents of a frozen VAE
(``--vae``: an image-tokenizer run's folder; latents divided by latent diffusion's scale, samples
decoded by the VAE before the judge) the same DiT under the same condition draws more readable
numbers than on pixels after the same steps, at about the same time per step (``--timing``: both
DiTs' training steps interleaved in one process, the latent one with its VAE encoding).

    polymodal train --config vqvae run_dir=VAE 'model.image_tokenizer:={name: vae, channels: 64, num_downsamples: 3, num_res_blocks: 2, dim: 8}' 'train.loss_weights:={kl: 1.0e-4}' train.steps=2400
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --vae VAE --patch 1 --conv-kernel 3 --steps 1000 --evals 250,500,1000 --out OUT
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --timing 10 --conv-kernel 3

Claim (BENCHMARKS.md, "A U-Net velocity network for the flow image heads"): with ``--decoder
unet`` (``decoders/unet.py``, the head's ``decoder: {name: unet}``) under the same condition and
steps the judge reads far more samples than with the DiT, on pixels (patch 2) and on latents, for
about twice the DiT's time per step (``--timing`` with ``--decoder unet`` adds the pixel U-Net).

    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --steps 1000 --evals 250,500,1000 --out OUT
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --decoder unet --vae VAE --patch 1 --channels 64 --channel-mults 1,2 --steps 1000 --out OUT
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_dit_alone.py --timing 6 --conv-kernel 3 --decoder unet --patch 2

Claim (BENCHMARKS.md, "The U-Net alone on a trained run's frozen condition"): with
``--condition-run RUN`` (a ``metaquery`` run) the condition is not the slot embedding but the
tokens the run's own queries and connector make of each item's caption, computed once and frozen
(its empty condition for dropout and guidance). Against the slot condition at the same steps this
tells whether the preset's failure lies in the form of its condition or in learning under a
condition that moves while the backbone trains. ``--standardize`` moves every condition feature to
zero mean and unit spread over the train items first. ``--frozen-slots`` keeps the slot embeddings
as drawn (never trained), to see whether the slot condition works by its form or by being learned.

    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --condition-run RUN --steps 1000 --evals 250,500,1000 --out OUT
    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --condition-run RUN --standardize --steps 1000 --evals 250,500,1000 --out OUT
    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --frozen-slots --steps 1000 --evals 500,1000 --out OUT

Claim (BENCHMARKS.md, "The U-Net alone under each item's own caption tokens"): with ``--caption``
the condition is each item's own caption, its BPE tokens embedded by a table the flow loss trains,
with fixed positions, read by no backbone (``--caption-layers N`` adds N transformer layers over
them). Against the slot condition and a run's query tokens at the same steps, this tells how much
of the gap is the caption's words and how much the path through the backbone. ``--numerals`` (a
diagnostic that knows the data) writes every caption as its number in digits, one token per digit.

    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --caption [--caption-layers 2 | --numerals] --steps 1000 --evals 500,1000 --out OUT

Claim (BENCHMARKS.md, "A trained backbone's caption states as the U-Net's condition"): with
``--condition-states RUN`` the condition is a trained run's final backbone states over each caption,
read as a source alone and frozen (MetaQuery's frozen pretrained model, without the queries): a run
whose backbone learnt to draw from captions gives the U-Net what the digit slots give.

    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --condition-states RUN --steps 1000 --evals 500,1000 --out OUT

Claim (BENCHMARKS.md, "The U-Net alone: averaged weights, shifted times and a learned start do not
draw more readable numbers"): on a trained run's caption states (``--condition-states``), in bf16
(``--precision bf16``, 1.6x faster per step than fp32 here), an exponential moving average of the
weights (``--ema``, evaluated beside the trained weights of the same run), SD3's time shift
(``--time-shift 3``) and a path that starts at a learned mean image of the condition plus noise
(``--prior``, Grad-TTS's prior) each read no more after 1,000 steps than the plain U-Net.

    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 2 --channels 32 --channel-mults 1,2,2 --condition-states RUN --precision bf16 --ema 0.99,0.998 --steps 1000 --evals 500,1000 --out OUT
    python benchmarks/bench_flow_dit_alone.py ... --precision bf16 --time-shift 3 ...
    python benchmarks/bench_flow_dit_alone.py ... --precision bf16 --prior --evals 250,500 ...

Claim (BENCHMARKS.md, "Guidance 4 and training times shifted toward noise"): trained with its times
shifted toward noise (``--time-shift 3``) and sampled on a uniform grid (``--sample-shift 1``), the
U-Net reads 41.8% after 1,000 steps at guidance 2 against 30.1% unshifted, and after 2,000 steps
72.7% at guidance 2 and 84.0% at guidance 4 (``--guidance 1,2,3,4``).

    python benchmarks/bench_flow_dit_alone.py ... --precision bf16 --time-shift 3 --sample-shift 1 --guidance 1,2,3,4 --steps 2000 --evals 1000,2000 --out OUT

Claim (BENCHMARKS.md, "The flow U-Net at patch 4"): at ``--patch 4`` (an 8 x 24 first level) the
U-Net's step takes a third of the time it takes at patch 2, and per second of training it reads as
much or more: 78.9% at guidance 4 after 3,000 of 6,000 steps (387 s) against 59.8% at patch 2
after 1,000 of 2,000 (388 s), and 88.3% after 6,000 (786 s) against 84.0% after 2,000 (848 s).

    python benchmarks/bench_flow_dit_alone.py --decoder unet --patch 4 --channels 32 --channel-mults 1,2,2 --condition-states RUN --precision bf16 --time-shift 3 --sample-shift 1 --guidance 2,4 --steps 6000 --evals 3000,6000 --out OUT

One thread: about 0.75 s per step of 64 images x 2 noise draws at patch 8 (dim 128, 4 blocks).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from polymodal.config import load_config
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets.base import build_source
from polymodal.datasets.spoken_numbers import judges
from polymodal.decoders.flow_networks import FLOW_NETWORKS
from polymodal.decoders.flow_sampling import guided, integrate
from polymodal.evaluation.reconstruction import image_grid, save_png
from polymodal.layers.positional import sincos_2d_embedding, sinusoidal_embedding
from polymodal.losses.flow_matching import flow_matching_loss, interpolate, target_velocity, training_times
from polymodal.modality import Modality
from polymodal.tokenizers.vae import VAETokenizer, measure_latent_scale
from polymodal.training.optim import lr_factor
from polymodal.training.run import load_run

SLOTS, DIGIT_VALUES = 3, 11  # hundreds, tens, units; ten digits and "none"
CONDITION_DIM, CONDITION_DROPOUT, WARMUP, MIN_LR_RATIO, WEIGHT_DECAY, CLIP = 128, 0.1, 100, 0.1, 0.05, 1.0
LOSS_TIMES = (0.05, 0.15, 0.25, 0.35, 0.5, 0.7, 0.9)
LOSS_ITEMS, SAMPLED, SHOWN = 128, 256, 32
ENCODE_CHUNK = 512  # images per VAE pass when encoding the splits
IMAGE_SIZE, LATENT_DIM, TIMING_WARMUP = (32, 96), 8, 2  # --timing: the built-in images, an 8x VAE of 8 channels


def digit_slots(numbers: torch.Tensor) -> torch.Tensor:
    """(B,) numbers < 1000 -> (B, 3) ids slot * 11 + digit, digit 10 for an unused leading slot."""
    digits = torch.stack([(numbers // 100) % 10, (numbers // 10) % 10, numbers % 10], dim=1)
    length = torch.where(numbers >= 100, 3, torch.where(numbers >= 10, 2, 1))
    used = torch.arange(SLOTS)[None] >= (SLOTS - length[:, None])
    return torch.arange(SLOTS)[None] * DIGIT_VALUES + torch.where(used, digits, DIGIT_VALUES - 1)


class RunCondition(nn.Module):
    """Frozen condition tokens (K, Nc, C), one row per key (an item), and the empty condition (Nc, C)."""

    def __init__(self, table: torch.Tensor, empty: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("empty", empty)

    def forward(self, keys: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        tokens = self.table[keys]
        if dropout:
            dropped = torch.rand(len(keys)) < dropout
            tokens = torch.where(dropped[:, None, None], self.empty.expand_as(tokens), tokens)
        return tokens


def run_conditions(
    run_dir: Path, train_count: int, test_count: int, standardize: bool = False
) -> tuple[RunCondition, torch.Tensor, torch.Tensor]:
    """The frozen condition of a ``metaquery`` run for the first train and test items, and the
    (train_count,), (test_count,) numbers they belong to (to check they line up with the images).
    With ``standardize`` every (token, feature) is shifted and scaled to zero mean and unit spread
    over the train items (the empty condition likewise): what differs between captions dominates."""
    from probe_flow_condition import conditions, flow_head  # the sibling script: run as python benchmarks/...

    run = load_run(run_dir)
    head = flow_head(run)
    if head.queries.read_source:
        raise SystemExit("--condition-run takes a run whose condition is the queries' alone (read_source off)")
    train_c, train_n = conditions(run, head, "train", train_count)
    test_c, test_n = conditions(run, head, "test", test_count)
    with torch.no_grad():
        empty = head.queries.empty(run.model, head.queries.queries[None]).condition[0].float()
    if standardize:
        mean, std = train_c.mean(0), train_c.std(0) + 1e-6  # (Nc, C) each
        train_c, test_c, empty = (train_c - mean) / std, (test_c - mean) / std, (empty - mean) / std
    return RunCondition(torch.cat([train_c, test_c]), empty), torch.from_numpy(train_n), torch.from_numpy(test_n)


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ids (K, L) padded with ``pad`` and mask (K, L) True on real tokens."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, row in enumerate(rows):
        ids[k, : len(row)], mask[k, : len(row)] = torch.tensor(row), True
    return ids, mask


@torch.no_grad()
def state_conditions(run_dir: Path, built, train_count: int, test_count: int) -> tuple[RunCondition, torch.Tensor, torch.Tensor]:
    """Each caption's final backbone states in a trained run of any preset (the caption as a source
    alone, as a text -> X task reads it: (L, D) per item, zeros past its end), frozen, for the first
    train and test items of the ``built`` data; the empty caption ([bos][eos]) as the empty
    condition. The run must have trained on the same built data (checked by its numbers)."""
    run = load_run(run_dir, device="cpu")
    model, tokenizer = run.model.eval(), run.tokenizer
    items = [(name, i) for name, count in (("train", train_count), ("test", test_count)) for i in built.split_indices(name)[:count]]
    rows = [[tokenizer.bos_id, *tokenizer.encode(built.captions[i]), tokenizer.eos_id] for _, i in items] + [[tokenizer.bos_id, tokenizer.eos_id]]
    ids, mask = padded(rows, tokenizer.pad_id)
    states = []
    for chunk, valid in zip(ids.split(ENCODE_CHUNK), mask.split(ENCODE_CHUNK)):
        tokens, keep = model.encode(Modality.TEXT, chunk, valid)
        states.append(model.source_states(tokens, keep).float().masked_fill(~keep[:, :, None], 0.0))
    table = torch.cat(states)  # (K + 1, L, D)
    numbers = torch.from_numpy(built.labels[[i for _, i in items]])
    return RunCondition(table[:-1], table[-1]), numbers[:train_count], numbers[train_count:]


class SlotCondition(nn.Module):
    """The condition tokens (B, 3, 128) of a number; a learned empty condition for dropout/guidance."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(SLOTS * DIGIT_VALUES, CONDITION_DIM)
        self.empty = nn.Parameter(torch.randn(SLOTS, CONDITION_DIM))

    def forward(self, numbers: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        tokens = self.embedding(digit_slots(numbers))
        if dropout:
            dropped = torch.rand(len(numbers)) < dropout
            tokens = torch.where(dropped[:, None, None], self.empty.expand_as(tokens), tokens)
        return tokens


class CaptionCondition(nn.Module):
    """Each item's own caption as the condition, read by no backbone: its token ids (K, L) embedded
    by a table the flow loss trains, plus fixed 1-D sin-cos positions, optionally through
    ``layers`` pre-norm transformer layers (a small text encoder the flow loss trains). The empty
    condition is the empty caption ([bos][eos] then padding), through the same path. Nothing here
    knows digits: the tokens are the BPE's."""

    def __init__(self, ids: torch.Tensor, empty_ids: torch.Tensor, vocab: int, *, layers: int = 0) -> None:
        super().__init__()
        self.register_buffer("ids", ids)  # (K, L) one caption per key, padded
        self.register_buffer("empty_ids", empty_ids)  # (L,)
        self.register_buffer("positions", sinusoidal_embedding(torch.arange(ids.shape[1]).float(), CONDITION_DIM))  # (L, C)
        self.embedding = nn.Embedding(vocab, CONDITION_DIM)
        nn.init.normal_(self.embedding.weight, std=1.0)  # as the slot embeddings: tokens that differ wholly
        layer = nn.TransformerEncoderLayer(CONDITION_DIM, 4, 4 * CONDITION_DIM, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(ids) + self.positions  # (B, L, C)
        return tokens if self.encoder is None else self.encoder(tokens)

    @property
    def empty(self) -> torch.Tensor:
        """(L, C) the empty caption's condition tokens."""
        return self.encode(self.empty_ids[None])[0]

    def forward(self, keys: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        ids = self.ids[keys]
        if dropout:
            dropped = torch.rand(len(keys)) < dropout
            ids = torch.where(dropped[:, None], self.empty_ids.expand_as(ids), ids)
        return self.encode(ids)


def caption_conditions(
    built, tokenizer: TextTokenizer, *, layers: int, numerals: bool = False
) -> tuple[CaptionCondition, torch.Tensor, torch.Tensor]:
    """The caption condition over the train then test items of the ``built`` data, and the keys of
    the train and test items into it. ``numerals``: every caption replaced by its number in digits
    ("412"), one BPE token per digit: a diagnostic that knows the data, to part the words'
    composition from the rest."""
    index = {name: built.split_indices(name) for name in ("train", "test")}
    texts = [str(int(built.labels[i])) if numerals else built.captions[i] for name in ("train", "test") for i in index[name]]
    rows = [[tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] for text in texts]
    ids, _ = padded(rows + [[tokenizer.bos_id, tokenizer.eos_id]], tokenizer.pad_id)  # the empty caption last
    count = len(index["train"])
    return CaptionCondition(ids[:-1], ids[-1], tokenizer.vocab_size, layers=layers), torch.arange(count), torch.arange(len(index["test"])) + count


def built_in_data(preset: str):
    """(train images, train numbers, test images, test numbers, image judge, held-out numbers, the
    built data, a BPE trained on the train captions as a run's); images (N, 1, H, W) in [-1, 1] as
    the collator makes them."""
    config = load_config([preset])
    source = build_source(config.data, config.seed)
    splits = source.load()
    tokenizer = TextTokenizer.train(splits.train_texts, vocab_size=config.data.vocab_size)
    collator = build_collator(tokenizer, config.data, front_end=source.source_text, seed=config.seed).log_mel_view()
    found = source.load_judges(splits, collator)
    built = source.built

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = built.split_indices(name)
        return torch.from_numpy(built.images[index]).float().div(127.5).sub(1)[:, None], torch.from_numpy(built.labels[index])

    return (*split("train"), *split("test"), found.image.eval(), set(int(n) for n in splits.heldout_labels), built, tokenizer)


def network_settings(args) -> dict:
    """The velocity network's spec: the preset's DiT (dim 128, 4 blocks, 4 heads) or the U-Net."""
    if args.decoder == "unet":
        return {"name": "unet", "channels": args.channels, "channel_mults": [int(m) for m in args.channel_mults.split(",")]}
    return {"name": "dit", "dim": 128, "num_layers": 4, "num_heads": 4, "conv_kernel": args.conv_kernel}


class PriorMap(nn.Module):
    """The path's start mean from the condition (Grad-TTS's prior, Popov et al. 2021,
    arXiv:2105.06337): one query per ``cell`` x ``cell`` block of the (C, H, W) map, fixed 2-D
    sin-cos positions, reads the condition tokens through ``layers`` pre-norm cross-attention and
    MLP layers; each query's state becomes its block's values. Trained by mean squared error
    against the data, so it learns the condition's mean image."""

    def __init__(self, shape: tuple[int, int, int], dim_condition: int, *, cell: int = 4, dim: int = 128, layers: int = 2) -> None:
        super().__init__()
        channels, height, width = shape
        self.cell, self.grid = cell, (height // cell, width // cell)
        self.register_buffer("positions", sincos_2d_embedding(*self.grid, dim))  # (h w, dim)
        self.keys = nn.Linear(dim_condition, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers))
        self.reads = nn.ModuleList(nn.MultiheadAttention(dim, 4, batch_first=True) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, channels * cell * cell))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(B, Nc, Cc) -> (B, C, H, W)."""
        keys = self.keys(context)
        h = self.positions.expand(len(context), -1, -1)
        for k, (read, mlp) in enumerate(zip(self.reads, self.mlps)):
            h = h + read(self.norms[2 * k](h), keys, keys, need_weights=False)[0]
            h = h + mlp(self.norms[2 * k + 1](h))
        c = self.cell
        return rearrange(self.out(h), "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid[0], p=c, q=c)


class SlotFlow(nn.Module):
    """The velocity network (DiT or U-Net) over patches of (C, H, W) maps (pixels, or a VAE's
    latents) and its slot condition; with ``prior`` the path starts at the condition's learned
    mean map plus noise, not at noise alone."""

    def __init__(self, shape: tuple[int, int, int], patch: int, network: dict, condition: nn.Module | None = None, *, prior: bool = False) -> None:
        super().__init__()
        channels, height, width = shape
        self.patch, self.grid = patch, (height // patch, width // patch)
        self.condition = condition if condition is not None else SlotCondition()  # called with each item's key
        dim_condition = condition.table.shape[-1] if isinstance(condition, RunCondition) else CONDITION_DIM
        self.network = FLOW_NETWORKS.build(network, channels * patch * patch, self.grid, dim_condition)
        self.prior = PriorMap(shape, dim_condition) if prior else None

    def start(self, noise: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The path's start: ``noise``, plus the condition's mean map (no gradient) with a prior."""
        if self.prior is None:
            return noise
        with torch.no_grad():
            return noise + self.prior(context).to(noise.dtype)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B,), (B, 3, 128) -> (B, C, H, W)."""
        p = self.patch
        tokens = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # (B, N, p p)
        return rearrange(self.network(tokens, t, context=context), "b (h w) (c p q) -> b c (h p) (w q)", h=self.grid[0], p=p, q=p)


class LatentSpace:
    """The frozen VAE of an image-tokenizer run: images <-> latents divided by latent diffusion's scale."""

    def __init__(self, run_dir: Path, train_images: torch.Tensor) -> None:
        self.vae = load_run(run_dir).model.tokenizer.eval()
        self.scale = 1.0
        self.scale = measure_latent_scale(self.encode(train_images)).item()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, dim, h, w) posterior means / scale, in chunks."""
        return torch.cat([self.vae.encode(chunk) for chunk in images.split(ENCODE_CHUNK)]) / self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, dim, h, w) scaled latents -> (N, 1, H, W) images in [-1, 1]."""
        return torch.cat([self.vae.decode(chunk * self.scale) for chunk in latents.split(ENCODE_CHUNK)]).clamp(-1, 1)


def judged_share(judge, images: torch.Tensor, numbers: torch.Tensor) -> float:
    """Share of (N, 1, H, W) images the judge reads as their number."""
    return round((judges.read_images(judge, images) == numbers).float().mean().item(), 4)


@torch.no_grad()
def evaluate(flow: SlotFlow, test: tuple[torch.Tensor, torch.Tensor, torch.Tensor], judge, heldout: set[int], args, step: int, tag: str = "") -> dict:
    """The fixed-time losses (own / empty condition) and the judged samples at ``step``; ``test``
    holds what the flow runs on (images, or scaled latents that ``args.space`` decodes), the
    numbers and the condition's keys. ``tag`` ends the sample PNGs' names."""
    flow.eval()
    images, numbers, keys = test
    row: dict = {"step": step}
    g = torch.Generator().manual_seed(5)
    data, own = images[:LOSS_ITEMS], flow.condition(keys[:LOSS_ITEMS])
    for t0 in LOSS_TIMES:
        noise = flow.start(torch.randn(data.shape, generator=g), own)
        t = torch.full((LOSS_ITEMS,), t0)
        x_t, target = interpolate(noise, data, t), target_velocity(noise, data)
        row[f"loss_t{t0}"] = [round(flow_matching_loss(flow.velocity(x_t, t, c), target).item(), 4) for c in (own, flow.condition.empty.expand_as(own))]
    own = flow.condition(keys[:SAMPLED])
    noise = torch.randn((SAMPLED, *images.shape[1:]), generator=torch.Generator().manual_seed(0))
    held = torch.tensor([int(n) in heldout for n in numbers[:SAMPLED]])
    if flow.prior is not None:  # the samples start at the mean map, which is also judged alone
        mean = flow.prior(own)
        noise = noise + mean
        shown = args.space.decode(mean) if args.space is not None else mean.clamp(-1, 1)
        save_png(image_grid(shown[:SHOWN]), args.out / f"step{step}_prior{tag}.png")
        row["judged_prior"] = judged_share(judge, shown, numbers[:SAMPLED])
    for w in args.guidance:
        field = guided(flow.velocity, own, flow.condition.empty[None], w)
        drawn = integrate(field, noise, steps=args.sample_steps, sampler="heun", shift=args.sample_shift)
        drawn = args.space.decode(drawn) if args.space is not None else drawn.clamp(-1, 1)
        save_png(image_grid(drawn[:SHOWN]), args.out / f"step{step}_w{w}{tag}.png")
        right = judges.read_images(judge, drawn) == numbers[:SAMPLED]
        row[f"judged_w{w}"] = round(right.float().mean().item(), 4)
        row[f"heldout_w{w}"] = round(right[held].float().mean().item(), 4) if held.any() else None
    flow.train()
    return row


def train(flow: SlotFlow, train_split: tuple[torch.Tensor, torch.Tensor, torch.Tensor], args, at_eval, averages=()) -> None:
    """AdamW with warm-up and cosine; ``at_eval(step)`` at each of ``args.evals``; ``train_split``
    holds the images, their numbers and the condition's keys. Each of ``averages`` (torch's
    ``AveragedModel``) is updated after every optimiser step."""
    images, _, keys = train_split
    params = [q for q in flow.parameters() if q.requires_grad]
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": WEIGHT_DECAY}, {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    evals = {int(s) for s in args.evals.split(",")}
    g = torch.Generator().manual_seed(1)
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step - 1, warmup_steps=WARMUP, total_steps=args.steps, min_lr_ratio=MIN_LR_RATIO)
        pick = torch.randint(len(images), (args.batch,), generator=g)
        data = images[pick].repeat_interleave(args.noise_draws, 0)  # (B k, 1, H, W)
        context = flow.condition(keys[pick], CONDITION_DROPOUT)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
            prior_loss = 0.0
            if flow.prior is not None:
                mean = flow.prior(context)  # (B, C, H, W)
                prior_loss = flow_matching_loss(mean, images[pick])
                start_mean = mean.detach().float().repeat_interleave(args.noise_draws, 0)
            context = context.repeat_interleave(args.noise_draws, 0)
            noise = torch.randn(data.shape, generator=g)
            if flow.prior is not None:
                noise = noise + start_mean
            t = training_times(len(data), distribution=args.time_distribution, shift=args.time_shift, generator=g)
            loss = flow_matching_loss(flow.velocity(interpolate(noise, data, t), t, context), target_velocity(noise, data))
            loss = loss + prior_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        for average in averages:
            average.update_parameters(flow)
        running += loss.item()
        if step % 50 == 0:
            logging.info("step %d loss (mean of 50) %.4f %.0f s", step, running / 50, time.perf_counter() - start)
            running = 0.0
        if step in evals:
            at_eval(step, round(time.perf_counter() - start))


def step_seconds(args) -> None:
    """Seconds per training step, pixel DiT against latent DiT (the VAE's encoding of the batch
    included, as the latent head pays it every step) and, with ``--decoder unet``, the pixel U-Net
    at ``--patch``, interleaved round-robin in one process on random inputs of the built-in shapes;
    prints a table with the ratios."""
    vae = VAETokenizer(channels=64, num_downsamples=3, num_res_blocks=2, dim=LATENT_DIM).eval()
    images = torch.rand(args.batch, 1, *IMAGE_SIZE) * 2 - 1  # (B, 1, 32, 96)
    latent_shape = (LATENT_DIM, IMAGE_SIZE[0] // vae.downsample_factor, IMAGE_SIZE[1] // vae.downsample_factor)
    dit = network_settings(argparse.Namespace(**{**vars(args), "decoder": "dit"}))
    flows = {"DiT, pixels, patch 8": SlotFlow((1, *IMAGE_SIZE), 8, dit), "DiT, latents, patch 1": SlotFlow(latent_shape, 1, dit)}
    if args.decoder == "unet":
        flows[f"U-Net {args.channels} x ({args.channel_mults}), pixels, patch {args.patch}"] = SlotFlow((1, *IMAGE_SIZE), args.patch, network_settings(args))
    numbers = torch.randint(1000, (args.batch,))
    seconds = {name: [] for name in flows}

    def one_step(name: str) -> None:
        flow = flows[name]
        data = vae.encode(images) if "latents" in name else images  # (B, C, h, w)
        data = data.repeat_interleave(args.noise_draws, 0)
        context = flow.condition(numbers).repeat_interleave(args.noise_draws, 0)
        noise, t = torch.randn(data.shape), torch.rand(len(data))
        loss = flow_matching_loss(flow.velocity(interpolate(noise, data, t), t, context), target_velocity(noise, data))
        flow.zero_grad()
        loss.backward()

    for round_ in range(TIMING_WARMUP + args.timing):
        for name in flows:
            start = time.perf_counter()
            one_step(name)
            if round_ >= TIMING_WARMUP:
                seconds[name].append(time.perf_counter() - start)
    base = sorted(seconds["DiT, pixels, patch 8"])[len(seconds["DiT, pixels, patch 8"]) // 2]
    print("| network (DiT: dim 128, 4 blocks, conv %d) | median s per step of %d x %d | / DiT pixels |" % (args.conv_kernel, args.batch, args.noise_draws))
    for name, times in seconds.items():
        median = sorted(times)[len(times) // 2]
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="metaquery", help="whose data (data.* of the preset)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--evals", default="500,1000", help="steps at which to evaluate")
    parser.add_argument("--patch", type=int, default=8, help="in pixels, or in latent positions with --vae")
    parser.add_argument("--vae", type=Path, help="flow on the latents of this image-tokenizer run's VAE (model.image_tokenizer: {name: vae})")
    parser.add_argument("--conv-kernel", type=int, default=0, help="the DiT's")
    parser.add_argument("--decoder", choices=FLOW_NETWORKS.names(), default="dit", help="the velocity network")
    parser.add_argument("--channels", type=int, default=32, help="the U-Net's first level")
    parser.add_argument("--channel-mults", default="1,2,2", help="the U-Net's levels")
    parser.add_argument("--time-distribution", default="uniform")
    parser.add_argument("--time-shift", type=float, default=1.0, help="the training times, and the sampling grid unless --sample-shift is given")
    parser.add_argument("--sample-shift", type=float, help="the sampling grid's own shift (default: --time-shift)")
    parser.add_argument("--prior", action="store_true", help="start the path at a learned mean map of the condition plus noise (Grad-TTS's prior)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--noise-draws", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training forward under bf16 autocast or not (evaluation is fp32)")
    parser.add_argument("--ema", default="", help="comma-separated decays: an exponential moving average of the weights per decay, each evaluated beside the trained weights")
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--guidance", default="1,2", help="comma-separated classifier-free guidance weights, each judged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--condition-run", type=Path, help="condition on this metaquery run's frozen query tokens, not digit slots")
    parser.add_argument("--frozen-slots", action="store_true", help="keep the slot embeddings as initialised (random, not learned)")
    parser.add_argument("--standardize", action="store_true", help="with --condition-run: each condition feature to zero mean, unit spread")
    parser.add_argument("--condition-items", type=int, default=8000, help="with --condition-run or --condition-states: the first train items to condition")
    parser.add_argument("--caption", action="store_true", help="condition on each item's caption tokens (no backbone), not digit slots")
    parser.add_argument("--condition-states", type=Path, help="condition on a trained run's frozen backbone states over each caption")
    parser.add_argument("--numerals", action="store_true", help="with --caption: every caption replaced by its number in digits (a diagnostic)")
    parser.add_argument("--caption-layers", type=int, default=0, help="with --caption: transformer layers over the caption tokens")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--timing", type=int, default=0, help="only time N steps of the pixel and the latent DiT, interleaved")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.guidance = [float(w) for w in args.guidance.split(",")]
    if args.sample_shift is None:
        args.sample_shift = args.time_shift
    if args.timing:
        return step_seconds(args)
    if args.out is None:
        parser.error("--out is required for a training run")
    if sum(map(bool, (args.condition_run, args.condition_states, args.caption))) > 1:
        parser.error("give at most one of --condition-run, --condition-states and --caption")
    if (args.numerals or args.caption_layers) and not args.caption:
        parser.error("--numerals and --caption-layers go with --caption")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test, judge, heldout, built, tokenizer = built_in_data(args.preset)
    args.space, header = None, {"judged_real": judged_share(judge, x_test[:SAMPLED], y_test[:SAMPLED])}
    if args.vae is not None:
        args.space = LatentSpace(args.vae, x_train)
        x_train, x_test = args.space.encode(x_train), args.space.encode(x_test)
        header |= {"latent_shape": list(x_train.shape[1:]), "latent_scale": round(args.space.scale, 4)}
        header["judged_reconstructed"] = judged_share(judge, args.space.decode(x_test[:SAMPLED]), y_test[:SAMPLED])
    logging.info("%s", json.dumps(header))
    condition, train_keys, test_keys = None, y_train, y_test
    if args.condition_run is not None or args.condition_states is not None:
        count = min(args.condition_items, len(y_train))
        if args.condition_run is not None:
            condition, train_n, test_n = run_conditions(args.condition_run, count, SAMPLED, args.standardize)
        else:
            condition, train_n, test_n = state_conditions(args.condition_states, built, count, SAMPLED)
        x_train, y_train = x_train[: len(train_n)], y_train[: len(train_n)]
        if not (torch.equal(train_n, y_train) and torch.equal(test_n, y_test[:SAMPLED])):
            raise SystemExit("the run's captions do not line up with the built-in images")
        train_keys, test_keys = torch.arange(len(train_n)), torch.arange(SAMPLED) + len(train_n)
        header |= {"condition_tokens": list(condition.table.shape[1:])}
    if args.caption:
        condition, train_keys, test_keys = caption_conditions(built, tokenizer, layers=args.caption_layers, numerals=args.numerals)
        header |= {"condition_tokens": list(condition.ids.shape[1:])}
    flow = SlotFlow(tuple(x_train.shape[1:]), args.patch, network_settings(args), condition, prior=args.prior)
    if args.frozen_slots:  # the slot embeddings stay as drawn: only the network learns
        flow.condition.requires_grad_(False)
    rows: list[dict] = []
    averages = {float(d): AveragedModel(flow, multi_avg_fn=get_ema_multi_avg_fn(float(d))) for d in filter(None, args.ema.split(","))}

    def at_eval(step: int, seconds: int) -> None:
        for decay, model in [(None, flow), *averages.items()]:
            row = evaluate(model if decay is None else model.module, (x_test, y_test, test_keys), judge, heldout, args, step, tag="" if decay is None else f"_ema{decay}")
            rows.append({**row, "ema": decay, "train_s": seconds})
            logging.info("%s", json.dumps(rows[-1]))
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "space"} | {"parameters": sum(p.numel() for p in flow.network.parameters())}
        (args.out / "figures.json").write_text(json.dumps({"settings": settings, "data": header, "evals": rows}, indent=1))

    train(flow, (x_train, y_train, train_keys), args, at_eval, list(averages.values()))
    judged = " | ".join(f"judged w={w:g} | held-out w={w:g}" for w in args.guidance)
    print(f"| step | weights | {judged} | " + " | ".join(f"loss t={t} own / empty" for t in LOSS_TIMES) + " |")
    for row in rows:
        judged = " | ".join(f"{row[f'judged_w{w}']:.1%} | {_share(row[f'heldout_w{w}'])}" for w in args.guidance)
        losses = " | ".join(f"{row[f'loss_t{t}'][0]:.3f} / {row[f'loss_t{t}'][1]:.3f}" for t in LOSS_TIMES)
        print(f"| {row['step']} | {'trained' if row['ema'] is None else 'EMA ' + str(row['ema'])} | {judged} | {losses} |")


if __name__ == "__main__":
    main()
