"""Where a `vq_codes` run's image positions look in the caption: for test captions of each digit
count, the attention every backbone layer and head gives each source token, by code column, with
the image's real codes teacher-forced (issue 18: do the later columns still read the caption, and
do they read the right digit?).

For each layer it prints the share of attention that goes to the source at all, by column (the
rest goes to the image's own codes drawn before), and for each head the digit token it reads most
in each column, with the weight it gives that token. Built-in data: the generator's source is the
number as digits, one token each between [bos] and [eos] (``Collator.source_texts``), so the
digit tokens are source positions 1 .. d.

The weights are recorded by swapping the backbone's ``attend`` for ``attention_weights`` (the
explicit path's float32 softmax) times the values, so every shape goes through one path.

    python benchmarks/probe_image_attention.py RUN --limit 300 [--digits 3]
"""

from __future__ import annotations

import argparse
import collections

import torch

import polymodal.layers.attention as attention
from polymodal.evaluation.samples import caption_batches
from polymodal.modality import Modality
from polymodal.training.run import load_run

recorded: list[torch.Tensor] = []


def recording_attend(q, k, v, mask, *, dropout: float = 0.0):
    """``attend`` in float32 that keeps its weights (B, H, N, N_kv) in ``recorded``."""
    weights = attention.attention_weights(q, k, mask)
    recorded.append(weights)
    return (weights @ v.float()).to(q.dtype)


@torch.no_grad()
def attention_by_column(run, limit: int) -> dict[tuple[int, int], torch.Tensor]:
    """{(digit count, layer): (H, columns, d + 3)} mean weights of each code column on [bos], the d
    digits, [eos] and the image's own positions, over the test captions of that digit count."""
    model, head = run.model.eval(), run.model.head(Modality.IMAGE)
    if head.order != "columns":
        raise SystemExit("this probe reads runs whose vq_codes head draws in `columns` order")
    columns = head.code_grid[1]
    sums, counts = collections.defaultdict(float), collections.Counter()
    attention.attend = recording_attend
    for captions, labels, real in caption_batches(run.splits.test, run.collator, 100, limit, Modality.IMAGE):
        ids, mask = run.collator.source_texts(Modality.IMAGE, captions)
        source, source_mask = model.encode(Modality.TEXT, ids, mask)
        codes = head.to_sequence(head.tokenizer.encode(real[0]))
        recorded.clear()
        head.teacher_forced(model, source, source_mask, codes)
        num_source = source.shape[1]
        for layer, weights in enumerate(recorded):
            for b, label in enumerate(labels.tolist()):
                image_rows = weights[b, :, num_source:]  # (H, positions, N)
                on_source = image_rows[:, :, :num_source][:, :, source_mask[b]]  # (H, positions, d + 2)
                on_image = image_rows[:, :, num_source:].sum(-1, keepdim=True)
                per_position = torch.cat([on_source, on_image], dim=-1)
                per_column = per_position.unflatten(1, (columns, -1)).mean(2)  # a column's positions are together
                key = (len(str(label)), layer)
                sums[key] = sums[key] + per_column
                counts[key] += 1
    return {key: total / counts[key] for key, total in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--limit", type=int, default=300, help="test captions (default 300)")
    parser.add_argument("--digits", type=int, default=3, help="report captions of this digit count (default 3)")
    args = parser.parse_args()
    means = attention_by_column(load_run(args.run_dir), args.limit)
    for (digits, layer), weights in sorted(means.items()):
        if digits != args.digits:
            continue
        source_share = weights[:, :, :-1].sum(-1).mean(0)
        print(f"layer {layer}: share of attention on the caption, by code column: " + " ".join(f"{x:.2f}" for x in source_share.tolist()))
        for h in range(weights.shape[0]):
            on_digits = weights[h, :, 1 : 1 + digits]  # (columns, d)
            most, which = on_digits.max(-1)
            print(
                f"  head {h}: digit read most, by column: {''.join(str(i + 1) for i in which.tolist())}; "
                f"its weight: {' '.join(f'{x:.2f}' for x in most.tolist())}"
            )


if __name__ == "__main__":
    main()
