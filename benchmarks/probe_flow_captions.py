"""How much a trained flow image head's losses rest on the caption (issue 18).

The head's training losses on the first test items, computed twice from one seed: under each
item's own caption, and under another item's caption (a fixed shuffle). The gap between the two
is what the caption tells the head. For a ``flow_matching_codes`` head it also gives the codes'
loss, whose gap says how much of the caption reaches the queries. Works on any run with a flow
image head, built-in or manifest.

    python benchmarks/probe_flow_captions.py RUN [--checkpoint auto|best|latest] [--items 256]
"""

from __future__ import annotations

import argparse

import torch

from polymodal.heads import Targets
from polymodal.modality import Modality
from polymodal.training.run import load_run


@torch.no_grad()
def losses_by_caption(run, items: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"own" | "shuffled": {loss name: value}} on the first ``items`` test items, eval mode."""
    model = run.model.eval()
    split = run.splits.test
    count = min(items, len(split))
    batch = run.collator([split[i] for i in range(count)])
    images, text, mask = batch.inputs[Modality.IMAGE], batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    shuffle = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    head = model.head(Modality.IMAGE)
    found = {}
    for name, order in {"own": torch.arange(count), "shuffled": shuffle}.items():
        torch.manual_seed(seed)  # the same noise and times under both
        source, source_mask = model.encode(Modality.TEXT, text[order], mask[order])
        out = head.loss(model, source, source_mask, Targets(images, None))
        found[name] = {key: float(value) for key, value in out.losses.items()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--checkpoint", default="auto", help="auto (the one eval uses), best or latest")
    parser.add_argument("--items", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # beside a training run
    run = load_run(args.run_dir, checkpoint=args.checkpoint)
    print(run.checkpoint)
    found = losses_by_caption(run, args.items)
    for key in found["own"]:
        print(f"{key or 'loss'}: own caption {found['own'][key]:.4f}, shuffled {found['shuffled'][key]:.4f}")


if __name__ == "__main__":
    main()
