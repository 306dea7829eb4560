"""How much of each real test image a preset's first stage (the VQ-VAE image tokenizer) keeps: its
PSNR and the share of reconstructions whose number the image judge still reads (issue 18: a text ->
image model that draws codes perfectly reads no better than this), with the judge's reading of the
real images beside it.

It trains only the first stage, in ``OUT/image_tokenizer`` (kept: a second call with the same
folder scores it again without training), from a preset and ``key=value`` overrides:

    python benchmarks/probe_vq_reconstruction.py OUT tokenizer_train.steps=1200 model.image_tokenizer.num_downsamples=2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from polymodal.config import load_config
from polymodal.datasets.spoken_numbers import judges
from polymodal.evaluation.run import EVAL_FILE
from polymodal.training.checkpoint import latest_checkpoint, load_checkpoint
from polymodal.training.job import plan_stages, prepare_stage_run, train_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="run folder; the first stage goes to its image_tokenizer/")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", default="generation", help="preset (default: generation)")
    parser.add_argument("--limit", type=int, default=2000, help="real test images scored (default 2000)")
    args = parser.parse_args()
    config = load_config([args.config], [f"run_dir={args.out}", "model.tasks=[text_to_image]", *args.overrides])
    stage = plan_stages(config)[0]
    trained = ""
    if not (stage.run_dir / EVAL_FILE).is_file():
        started = time.perf_counter()
        train_stage(stage, None)
        trained = f"; trained and evaluated in {time.perf_counter() - started:.0f} s"
    run = prepare_stage_run(stage.config, stage.run_dir, resume=True)
    load_checkpoint(latest_checkpoint(stage.run_dir), model=run.model)
    run.model.eval()
    source, collator = run.source, run.collator.log_mel_view()
    found = source.load_judges(run.splits, collator)
    with torch.no_grad():
        kept = judges.reconstructed_probe_accuracy(run.model.tokenizer, found.image, run.splits.test, collator, device="cpu", limit=args.limit)
    figures = json.loads((stage.run_dir / EVAL_FILE).read_text())["figures"]["reconstruction"]
    grid = run.model.tokenizer.token_grid(config.data.image_height, config.data.image_width)
    print(
        f"codes {grid[0]} x {grid[1]}: PSNR {figures['psnr']:.1f} dB, perplexity {figures['perplexity']:.0f}; "
        f"the judge reads {kept:.1%} of the reconstructions and {found.image_accuracy:.1%} of the real images "
        f"({args.limit} test images{trained})"
    )


if __name__ == "__main__":
    main()
