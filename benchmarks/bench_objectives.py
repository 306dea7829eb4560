"""Which remedy removes the interference between the default preset's objectives (issue 14)?

The default preset with its contrastive terms at weight 1 (the preset itself weights them 0.2:
at 1 they cost audio->text several points), trained once per row: plain, PCGrad, GradNorm, the
seed-003 curriculum (contrastive off for 30% of training, then opened linearly by 60%), each
decoupling module, shared-private with its own schedule, and whatever combination the table
suggests. Every row is a whole main job (`polymodal train`) with the same seed and data; the
VQ-VAE of stage 1 is trained once and copied into every row's run folder (it is identical: same
config, seed and data), so rows differ only in the second stage. The table gives every main-job
line, the held-out-number figures and the time.

    python benchmarks/bench_objectives.py --out runs/objectives                  # every row
    python benchmarks/bench_objectives.py --out runs/objectives --rows plain pcgrad
    python benchmarks/bench_objectives.py --out runs/objectives --table-only     # print the table

Rows already finished (an ``eval.json``) are not trained again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from polymodal.config import dump_config, load_config

PAIRS = ("contrastive_image_text", "contrastive_audio_text", "contrastive_image_audio")
WEIGHT_ONE = "train.loss_weights={" + ", ".join(f"{p}: 1.0" for p in PAIRS) + "}"
OPENING = "[[0, 0], [0.3, 0], [0.6, 1]]"  # seed 003: private first, the shared bridge opened linearly
CURRICULUM = "train.loss_schedules={" + ", ".join(f"{p}: {OPENING}" for p in PAIRS) + "}"
# Shared-private's own schedule: independence weighted early, alignment rising later (seed 003).
SHARED_PRIVATE_SCHEDULE = (
    "train.loss_schedules={"
    + ", ".join(f"align_{p[len('contrastive_'):]}: {OPENING}" for p in PAIRS)
    + ", "
    + ", ".join(f"independence_{m}: [[0, 1], [0.3, 1], [1, 0.1]]" for m in ("image", "text", "audio"))
    + "}"
)
MOE = "model.backbone.moe={layers: [1, 3], num_shared_experts: 2, num_private_experts: 1, top_k: 2, capacity_factor: 1.25}"
ROWS: dict[str, list[str]] = {
    "preset (weight 0.2)": [],
    "plain": [WEIGHT_ONE],
    "pcgrad": [WEIGHT_ONE, "train.gradient_surgery={name: pcgrad}"],
    "gradnorm": [WEIGHT_ONE, "train.gradient_surgery={name: gradnorm, layer: backbone.final_norm}"],
    "curriculum": [WEIGHT_ONE, CURRICULUM],
    "query_bank": [WEIGHT_ONE, "model.decoupler={name: query_bank}"],
    "typed_slots": [WEIGHT_ONE, "model.decoupler={name: typed_slots}"],
    "shared_private": [WEIGHT_ONE, "model.decoupler={name: shared_private}"],
    "shared_private + schedule": [WEIGHT_ONE, "model.decoupler={name: shared_private}", SHARED_PRIVATE_SCHEDULE],
    "modality MoE": [WEIGHT_ONE, MOE],
}
LINES = {  # figure -> (key path in eval.json, line of issue 14)
    "image->text": (("image_to_text", "exact"), 0.95),
    "audio->text": (("audio_to_text", "exact"), 0.95),
    "R@1 i->t": (("retrieval_image_to_text", "R@1"), 0.90),
    "R@1 t->i": (("retrieval_text_to_image", "R@1"), 0.90),
    "text->image": (("text_to_image", "probe_correct"), 0.90),
    "text->audio": (("text_to_audio", "probe_correct"), 0.90),
}
HELD_OUT = {
    "image->text": ("image_to_text", "heldout_exact"),
    "audio->text": ("audio_to_text", "heldout_exact"),
    "text->image": ("text_to_image", "heldout_probe_correct"),
    "text->audio": ("text_to_audio", "heldout_probe_correct"),
}


def _folder(out: Path, row: str) -> Path:
    return out / row.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "and").replace(".", "")


def train_row(out: Path, row: str, extra: list[str]) -> float:
    """Train one row (stage 1 copied from the first row that has it); its wall seconds."""
    run_dir = _folder(out, row)
    stage = run_dir / "image_tokenizer"
    donor = next((p / "image_tokenizer" for p in out.iterdir() if (p / "image_tokenizer" / "eval.json").is_file()), None)
    overrides = [f"run_dir={run_dir}", "train.progress=false", "tokenizer_train.progress=false", *ROWS[row], *extra]
    if donor is not None and not stage.exists():
        # The copied stage is a started run: the job resumes it (stage 1 done) with this row's config.
        shutil.copytree(donor, stage)
        dump_config(load_config((), overrides), run_dir / "config.yaml")
    command = [sys.executable, "-m", "polymodal.cli.main", "train", *overrides]
    resume = ["--resume"] if (run_dir / "config.yaml").exists() else []
    start = time.perf_counter()
    with open(out / f"{run_dir.name}.log", "a") as log:
        subprocess.run(command[:4] + resume + command[4:], check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    return seconds


def table(out: Path) -> str:
    header = "| row | " + " | ".join(LINES) + " | held-out i->t / a->t / t->i / t->a | time s |"
    lines = [header, "|---" * (len(LINES) + 3) + "|"]
    for row in ROWS:
        path = _folder(out, row) / "eval.json"
        if not path.is_file():
            continue
        figures = json.loads(path.read_text())["figures"]
        cells = []
        for (first, second), line in LINES.values():
            value = figures.get(first, {}).get(second)
            cells.append("-" if value is None else f"{100 * value:.1f}%" + (" (met)" if value >= line else ""))
        held = [figures.get(a, {}).get(b) for a, b in HELD_OUT.values()]
        held_text = " / ".join("-" if v is None else f"{100 * v:.1f}" for v in held)
        wall = _folder(out, row) / "wall_seconds.txt"
        seconds = wall.read_text().strip() if wall.is_file() else "-"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {held_text} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the rows' run folders")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"rows to train (default all): {', '.join(ROWS)}")
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished rows")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value added to every row (e.g. train.steps=1200)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for row in args.rows:
            if row not in ROWS:
                parser.error(f"unknown row {row!r}; valid: {', '.join(ROWS)}")
            if not (_folder(out, row) / "eval.json").is_file():
                print(f"{row}: {train_row(out, row, args.overrides):.0f} s", flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
