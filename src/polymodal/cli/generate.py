"""Generate with a trained any-to-any run: text from an image or a clip, an image or speech from text.

  polymodal generate runs/default --from image digits.png --to text
  polymodal generate runs/default --from audio clip.wav --to text
  polymodal generate runs/default --from text "forty two" --to image          # writes generated.png
  polymodal generate runs/default --from text "forty two" --to audio --out 42.wav

Text is printed. An image is written as a PNG at the data's size; speech as a 16-bit WAV (the
predicted log-mel through Griffin-Lim). A generator reads the text as the run's dataset prepares it
(the built-in data: the digits of the number a text names for an image, its words for speech).
Text is decoded greedily, or by beam search over --beams N (default: the text head's ``num_beams``),
unless --temperature is above 0. An image head that draws (``vq_codes``:
its configured temperature, top-k and guidance; a flow decoder, ``flow_matching``, ``mas_mel`` with
``decoder: flow``: its noise) draws from --seed; --temperature, --top-k, --steps and --guidance
replace the run's configured ones for heads that take them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from polymodal.modality import Modality

DEFAULT_OUT = {Modality.IMAGE: "generated.png", Modality.AUDIO: "generated.wav"}
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
# (source, target) pairs the command knows; a run must have been trained for the one asked.
ROUTES = ((Modality.IMAGE, Modality.TEXT), (Modality.AUDIO, Modality.TEXT), (Modality.TEXT, Modality.IMAGE), (Modality.TEXT, Modality.AUDIO))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="an any-to-any run folder written by `polymodal train`")
    parser.add_argument(
        "--from",
        dest="source",
        nargs=2,
        metavar=("MODALITY", "INPUT"),
        required=True,
        help="the source: `image PATH`, `audio PATH` or `text \"words\"`",
    )
    parser.add_argument("--to", dest="target", required=True, help="the target modality: text, image or audio")
    parser.add_argument("--out", help="where to write an image (PNG) or speech (WAV); default generated.png / .wav")
    parser.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy (default: the head's, greedy for text)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens; 0 = all (default: the head's)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--beams", dest="num_beams", type=int, help="beam search over N beams at temperature 0; 1 = greedy (default: the head's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and of Griffin-Lim's phases")
    parser.add_argument("--steps", type=int, help="a flow decoder's integration steps (default: the run's config)")
    parser.add_argument("--guidance", type=float, help="an image head's classifier-free guidance scale (default: the run's config)")


def parse_route(source: str, target: str) -> tuple[Modality, Modality]:
    """(``"text"``, ``"image"``) -> (TEXT, IMAGE); a ConfigError naming the valid routes otherwise."""
    from polymodal.errors import ConfigError

    valid = ", ".join(f"--from {s} --to {t}" for s, t in ROUTES)
    try:
        route = Modality.parse(source), Modality.parse(target)
    except ValueError as exc:
        raise ConfigError(f"{exc}; valid: {valid}") from None
    if route not in ROUTES:
        raise ConfigError(f"cannot generate {target} from {source}; valid: {valid}")
    return route


@torch.no_grad()
def generate(run: Any, source: Modality, target: Modality, query: str, **sampling: Any) -> Any:
    """Text (str), an image ((C, H, W) in [-1, 1]) or speech ((T,) waveform) from one input.

    Args:
        run: a loaded any-to-any run (``polymodal.training.run.load_run``).
        query: the text, or the path of the image or audio file.
        sampling: options for the target's head (temperature, top_k, top_p, steps, guidance,
            generator); those its ``generate`` does not take are left out.
    """
    from polymodal.data.collate import collate_query
    from polymodal.errors import ConfigError, DataError
    from polymodal.heads import generation_options

    model = run.model.eval()
    tasks = getattr(model, "generation_tasks", None)
    if tasks is None:
        raise ConfigError(f"{run.run_dir} is not an any-to-any run (model.architecture=any_to_any); generate needs one")
    if (source, target) not in {(t.source, t.target) for t in tasks.values()}:
        raise ConfigError(f"{run.run_dir} was not trained for {source}_to_{target} (its tasks: {', '.join(model.tasks)})")
    data = run.config.data
    device = next(model.parameters()).device
    options = generation_options(model.head(target), **sampling)  # what this run's head takes
    if target is Modality.TEXT:
        batch = collate_query(run.collator, data, source, query).to(device)
        ids = model.generate(source, target, batch.inputs[source], batch.masks.get(source), max_new_tokens=data.max_text_tokens, **options)[0]
        return run.tokenizer.decode(ids)
    ids, mask = (t.to(device) for t in run.collator.source_texts(target, [query]))  # what the generator reads
    if target is Modality.IMAGE:
        return model.generate(source, target, ids, mask, **options)[0].cpu()
    from polymodal.evaluation.samples import vocoder_for, voiced_frames

    mels = model.generate(source, target, ids, mask, **options).cpu()  # (1, F, M)
    waveform = vocoder_for(data)(mels, generator=sampling.get("generator"))[0]
    voiced = waveform[: int(voiced_frames(mels)[0]) * data.hop_length]
    if voiced.numel() == 0:
        raise DataError(f"{run.run_dir} generated no voiced frame for {query!r}; a longer-trained run speaks")
    return voiced


def check_options(args: argparse.Namespace, target: Modality) -> Path | None:
    """The sampling settings in range and ``--out`` a file of the target's type (returned)."""
    from polymodal.errors import ConfigError

    temperature = 0.0 if args.temperature is None else args.temperature
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < args.top_p <= 1 or (args.top_k or 0) < 0:
        raise ConfigError("need a finite --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    if args.num_beams is not None and (args.num_beams < 1 or temperature > 0):
        raise ConfigError(f"--beams {args.num_beams}: give N >= 1, with --temperature 0 (beams search for the likeliest text; they do not sample)")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if target is Modality.TEXT:
        return None
    out = Path(args.out or DEFAULT_OUT[target])
    suffix = Path(DEFAULT_OUT[target]).suffix
    if out.suffix.lower() != suffix:
        raise ConfigError(f"--out {out}: {target} is written as {suffix}; give a file name ending in {suffix}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / DEFAULT_OUT[target]}")
    return out


def run(args: argparse.Namespace) -> int:
    from polymodal.errors import ConfigError
    from polymodal.heads import generation_options
    from polymodal.training.run import load_run

    source, target = parse_route(args.source[0], args.target)
    out = check_options(args, target)
    run_dir = Path(args.run_dir)
    loaded = load_run(run_dir)
    generator = torch.Generator().manual_seed(args.seed)
    sampling = dict(top_p=args.top_p, generator=generator)
    given = (("temperature", args.temperature), ("top_k", args.top_k), ("steps", args.steps), ("guidance", args.guidance), ("num_beams", args.num_beams))
    chosen = {key: value for key, value in given if value is not None}  # replace the head's configured ones
    head = loaded.model.head(target) if hasattr(loaded.model, "head") else None
    unused = [f"--{key}" for key in chosen if head is not None and key not in generation_options(head, **chosen)]
    if unused:
        raise ConfigError(f"{' and '.join(unused)}: the {target} head of {run_dir} ({head.registry_name}) takes no such option")
    result = generate(loaded, source, target, args.source[1], **sampling, **chosen)
    if out is None:
        print(result)
        return 0
    if target is Modality.IMAGE:
        from polymodal.data.image import denormalize_images
        from PIL import Image

        pixels = (denormalize_images(result).clamp(0, 1) * 255).round().to(torch.uint8)  # (C, H, W)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[0].numpy() if len(pixels) == 1 else pixels.permute(1, 2, 0).numpy()).save(out)
    else:
        from polymodal.decoders.vocoder import write_wav

        write_wav(out, result, loaded.config.data.sample_rate)
    print(f"wrote {out}")
    return 0
