"""Does a text -> image `vq_codes` run draw a three-digit number's later digits right when the
first columns are given? The real image's codes fill the first fraction of the code columns, the
head draws the rest (its own sampling unless overridden), and the judge reads the result: exact,
and right by digit place (issue 18: is a wrong third digit drift from the model's own earlier
columns, or a place the model never learned?). Built-in data only: the judge reads the
spoken-numbers images.

    python benchmarks/probe_image_prefix.py RUN --limit 300 --fractions 0 0.333 0.5 0.667
    python benchmarks/probe_image_prefix.py RUN --fractions 0 --temperature 0   # greedy
"""

from __future__ import annotations

import argparse

import torch

from polymodal.datasets.spoken_numbers import judges
from polymodal.evaluation.samples import caption_batches
from polymodal.heads.text import cached_target_step
from polymodal.modality import Modality
from polymodal.training.run import load_run


def three_digit_items(run, limit: int) -> tuple[list[str], list[int], torch.Tensor]:
    """(captions, numbers, real images) of the first ``limit`` test items whose number has 3 digits."""
    captions, numbers, images = [], [], []
    for batch_captions, labels, (values, _, present) in caption_batches(run.splits.test, run.collator, 64, None, Modality.IMAGE):
        for caption, label, value, here in zip(batch_captions, labels.tolist(), values, present.tolist()):
            if here and label >= 100 and len(captions) < limit:
                captions.append(caption), numbers.append(label), images.append(value)
        if len(captions) >= limit:
            break
    return captions, numbers, torch.stack(images)


@torch.no_grad()
def draw_after(model, head, source, source_mask, given: torch.Tensor, keep: int, sampling: dict, guidance: float) -> torch.Tensor:
    """Code grids (B, h, w): the first ``keep`` positions' blocks from ``given`` (B, h * w) in the
    head's order, the rest drawn through the KV cache with classifier-free guidance."""
    g, empty = head.group_size, guidance != 1.0
    if empty:
        source, source_mask = head.with_empty_source(source, source_mask)
    copies = 2 if empty else 1
    cache = model.backbone.new_cache(len(source), source.shape[1] + head.num_positions, device=source.device, dtype=source.dtype)
    every = torch.ones(len(source), 1, dtype=torch.bool)
    hidden = model.run(source, source_mask, head.embed_inputs(model, head.start_block(len(source), source.device), 0), every, cache=cache)[:, -1]
    blocks = []
    for step in range(head.num_positions):
        block = given[:, step * g : (step + 1) * g] if step < keep else head.draw_block(hidden, guidance, sampling)
        blocks.append(block)
        if step + 1 < head.num_positions:
            token = head.embed_inputs(model, block.repeat(copies, 1), step + 1)
            hidden = cached_target_step(model, token, source_mask, step + 1, cache)[:, -1]
    return head.to_grid(torch.cat(blocks, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--limit", type=int, default=300, help="three-digit test captions (default 300)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 1 / 3, 0.5, 2 / 3], help="shares of code columns given")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    run = load_run(args.run_dir)
    model = run.model.eval()
    head = model.head(Modality.IMAGE)
    found = run.source.load_judges(run.splits, run.collator.log_mel_view())
    torch.manual_seed(0)
    captions, numbers, images = three_digit_items(run, args.limit)
    given = head.to_sequence(head.tokenizer.encode(images))
    temperature = head.temperature if args.temperature is None else args.temperature
    sampling = dict(temperature=temperature, top_k=head.top_k if temperature > 0 else 0, top_p=1.0, generator=None)
    guidance = head.guidance if args.guidance is None else args.guidance
    positions_per_column = head.code_grid[0] // head.group[0]
    columns = head.code_grid[1] // head.group[1]
    for fraction in args.fractions:
        keep = round(columns * fraction)
        drawn = []
        for start in range(0, len(captions), 50):
            ids, mask = run.collator.source_texts(Modality.IMAGE, captions[start : start + 50])
            source, valid = model.encode(Modality.TEXT, ids, mask)
            with model.routing.of(Modality.TEXT, Modality.IMAGE):
                grid = draw_after(model, head, source, valid, given[start : start + 50], keep * positions_per_column, sampling, guidance)
            drawn.append(head.tokenizer.decode(grid).clamp(-1, 1))
        read = judges.read_images(found.image, torch.cat(drawn)).tolist()
        exact = sum(str(a) == str(r) for a, r in zip(numbers, read)) / len(numbers)
        whole = [(str(a), str(r)) for a, r in zip(numbers, read) if len(str(r)) == 3]
        places = ", ".join(f"{sum(a[i] == r[i] for a, r in whole) / max(len(whole), 1):.1%}" for i in range(3))
        print(f"first {keep} of {columns} code columns given: exact {exact:.1%}, three digits read {len(whole) / len(numbers):.1%}, right by place {places}")


if __name__ == "__main__":
    main()
