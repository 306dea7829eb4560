"""The report's sections, each built from the runs' data (``runs.RunData``), one column per run.

Every section is always on the page; where a run has nothing for it (no diagnostics, no mixture
of experts, no decoupler, no samples yet) its column says so, which keeps two runs aligned and
lets the browser test find every section of every report.

Curves over training come from ``metrics.jsonl`` (``train``: losses, ``lr``, ``grad_norm``;
``val``: the periodic evaluation; ``diag``: the live diagnostics' scalars), matrices from
``diagnostics.jsonl`` (``diagnostics/live_hook.py`` documents both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from polymodal.report import diagnostic_figures as drawings
from polymodal.report.diagnostic_figures import CKA_RANGE
from polymodal.report.figures import Panel, Series, curves_figure
from polymodal.report.html import Section, audio_player, esc, figure_img, note, number_cell, png_img, table
from polymodal.report.lines import Line, lines_for
from polymodal.report.runs import RunData, finite

HEATMAPS_OVER_TRAINING = 4  # CKA matrices drawn per run: the first, the last and evenly between
HEATMAPS_PER_ROW = 2  # two CKA matrices of 15 rows fit across a run's column with readable labels
TIMING_KEYS = ("train/wall_seconds", "train/samples_per_second")


def build_sections(runs: Sequence[RunData], presets: Sequence[str | None]) -> list[Section]:
    """Every section, in page order; ``presets[i]`` is the preset whose lines ``runs[i]`` is held to."""
    lines = [lines_for(preset) for preset in presets]
    return [
        overview(runs, lines, presets), losses(runs), figures(runs, lines), cka(runs), conflict(runs), experts(runs),
        leakage(runs), rank(runs), samples(runs), config(runs),
    ]  # fmt: skip


def overview(runs: Sequence[RunData], lines: Sequence[Sequence[Line]], presets: Sequence[str | None]) -> Section:
    columns = []
    for run, run_lines, preset in zip(runs, lines, presets):
        steps, loss = run.series("train", "loss")
        rows = [
            ["folder", esc(run.path)],
            ["architecture", esc(run.config.get("model", {}).get("architecture", "?"))],
            ["lines", esc(f"{len(run_lines)} (preset {preset})" if run_lines else "none for this preset")],
            ["steps logged", esc(max(steps, default=0))],
            ["last loss", number_cell(loss[-1] if loss else None)],
        ]
        rows += [[key.removeprefix("train/").replace("_", " "), number_cell(run.figures.get(key))] for key in TIMING_KEYS]
        rows.append(["live diagnostics", esc(diagnostics_summary(run))])
        columns.append(table(["", ""], rows))
    return Section("overview", "Overview", "", columns)


def diagnostics_summary(run: RunData) -> str:
    """How many measurements, and their share of the training time."""
    if not run.diagnostics:
        return "off (train.diagnostics.every=0)"
    seconds = sum(r.get("seconds", 0.0) for r in run.diagnostics)
    wall = run.figures.get("train/wall_seconds")
    share = f", {100 * seconds / wall:.1f}% of training time" if wall else ""
    return f"{len(run.diagnostics)} measurements of {run.diagnostics[-1]['items']} items, {seconds:.1f} s{share}"


def losses(runs: Sequence[RunData]) -> Section:
    loss_names = [[n for n in run.names("train") if n == "loss" or n.startswith("loss/")] for run in runs]
    values = [v for run, names in zip(runs, loss_names) for n in names for v in run.series("train", n)[1]]
    positive = [v for v in finite(values) if v > 0]
    shared = (min(positive) * 0.8, max(positive) * 1.25) if len(runs) > 1 and positive else None  # one scale for both
    columns = []
    for run, names in zip(runs, loss_names):
        if not names:
            columns.append(note("nothing logged yet"))
            continue
        terms = [Series(n.removeprefix("loss/") if n != "loss" else "total (weighted)", *run.series("train", n)) for n in names]
        panels = [
            Panel("loss terms (unweighted) and the weighted total", terms, log_y=True, y_range=shared),
            Panel("learning rate", [Series("lr", *run.series("train", "lr"))]),
            Panel("gradient norm before clipping", [Series("grad_norm", *run.series("train", "grad_norm"))], log_y=True),
        ]
        columns.append(figure_img(curves_figure(panels, columns=grid(runs, panels)), f"{run.name}: losses and learning rate"))
    intro = note("Each named loss term as the model returns it (unweighted), the total the optimiser minimised, the learning rate and the gradient norm, per logged step.")
    return Section("losses", "Losses and learning rate", intro, columns)


def figures(runs: Sequence[RunData], lines: Sequence[Sequence[Line]]) -> Section:
    every_line = list({line.figure: line for run_lines in lines for line in run_lines}.values())
    columns = []
    for run, run_lines in zip(runs, lines):
        parts = [] if run.figures else [note("no eval.json yet: the run has not finished its test evaluation")]
        panels = [
            Panel(line.label, [Series("val", *run.series("val", line.figure)), Series(f">= {line.at_least:g}", *_flat(run, line), dashed=True)])
            for line in run_lines
            if run.series("val", line.figure)[0]
        ]
        if panels:
            parts.append(figure_img(curves_figure(panels, columns=grid(runs, panels)), f"{run.name}: validation figures against their lines"))
        elif run_lines:
            parts.append(note("no periodic validation figures logged (train.eval_every)"))
        columns.append("".join(parts) or note("no lines for this preset; all test figures are listed below"))
    rows = [
        [esc(line.label), esc(line.figure), f">= {100 * line.at_least:g}%"]
        + [number_cell(run.figures.get(line.figure), percent=True, verdict=line.met(run.figures) if line in run_lines else None)
           for run, run_lines in zip(runs, lines)]
        for line in every_line
    ]  # fmt: skip
    footer = table(["figure", "eval.json key", "line", *(r.name for r in runs)], rows) if rows else ""
    keys = sorted({key for run in runs for key in run.figures})
    everything = table(["eval.json key", *(r.name for r in runs)], [[esc(k), *(number_cell(r.figures.get(k)) for r in runs)] for k in keys])
    footer += f"<details><summary>all {len(keys)} test figures</summary>{everything}</details>" if keys else ""
    intro = note("Test-split figures (eval.json) against the lines of the run's preset; above, the periodic validation figures over training with the line dashed.")
    return Section("figures", "Evaluation against the lines", intro, columns, footer)


def grid(runs: Sequence[RunData], panels: Sequence[Panel]) -> int:
    """Panels per row: three across a page of one run, two in each of two runs' columns."""
    return max(1, min(len(panels), 3 if len(runs) == 1 else 2))


def _flat(run: RunData, line: Line) -> tuple[list[int], list[float]]:
    steps = run.series("val", line.figure)[0]
    return [steps[0], steps[-1]], [line.at_least, line.at_least]


def cka(runs: Sequence[RunData]) -> Section:
    def draw(run: RunData, records: list[dict]) -> str:
        pairs: dict[str, list[Series]] = {}
        for name in run.names("diag"):
            if name.startswith("cka/"):
                _, pair, layer = name.split("/")
                pairs.setdefault(pair, []).append(Series(layer, *run.series("diag", name)))
        panels = [Panel(f"CKA {pair.replace('-', ' vs ')}", series, y_range=CKA_RANGE) for pair, series in pairs.items()]
        chosen = spread(records, HEATMAPS_OVER_TRAINING)
        heatmaps = drawings.cka_figure([(f"step {r['step']}", r) for r in chosen], per_row=HEATMAPS_PER_ROW)
        return (
            figure_img(curves_figure(panels, columns=grid(runs, panels)), f"{run.name}: cross-modal CKA per layer")
            + figure_img(heatmaps, f"{run.name}: CKA between every modality and layer over training")
        )

    columns = per_run(runs, lambda r: r.get("cka"), "no live diagnostics in this run (train.diagnostics.every=N turns them on)", draw)
    intro = note(
        "Unbiased linear CKA between the pooled backbone states of the same validation items in two modalities, per "
        "layer (L0: what enters the backbone; Lk: after block k), over training; then the CKA between every "
        "(modality, layer) at a few steps. Higher in the shared layers than at L0 means the backbone brings the modalities together."
    )
    return Section("cka", "Cross-modal CKA", intro, columns)


def diag_curves(run: RunData, names: Sequence[str] | str, title: str, *, y_range: tuple[float, float] | None = None) -> str:
    """One panel of live-diagnostics scalars over training (the ``names``, or every name starting
    with the prefix ``names``), each labelled by its name past the kind (``experts/block1/text/entropy``
    -> ``block1/text``)."""
    if isinstance(names, str):
        names = [n for n in run.names("diag") if n.startswith(names)]
    label = lambda name: name.split("/", 1)[1].removesuffix("/entropy")  # noqa: E731
    series = [Series(label(n), *run.series("diag", n)) for n in names]
    return figure_img(curves_figure([Panel(title, series, y_range=y_range)]), f"{run.name}: {title}")


def spread(records: Sequence[Any], count: int) -> list[Any]:
    """Up to ``count`` of ``records``: the first, the last and evenly between."""
    if len(records) <= count:
        return list(records)
    return [records[round(i * (len(records) - 1) / (count - 1))] for i in range(count)]


def per_run(runs: Sequence[RunData], has: Callable[[dict], Any], missing: str, draw: Callable[[RunData, list[dict]], str]) -> list[str]:
    """One column per run: ``draw(run, records)`` over its diagnostics records that ``has``
    accepts, or the note ``missing`` when it has none."""
    columns = []
    for run in runs:
        measured = [r for r in run.diagnostics if has(r)]
        columns.append(draw(run, measured) if measured else note(missing))
    return columns


def conflict(runs: Sequence[RunData]) -> Section:
    def draw(run: RunData, measured: list[dict]) -> str:
        heatmap = drawings.conflict_figure(measured[-1], f"gradient cosine, step {measured[-1]['step']}")
        curves = diag_curves(run, ["conflict/min", "conflict/mean"], "cosine between loss terms' gradients", y_range=(-1.0, 1.0))
        return figure_img(heatmap, f"{run.name}: gradient conflict") + curves

    columns = per_run(runs, lambda r: r.get("gradient_conflict"), "no gradient conflict measured in this run", draw)
    intro = note("Cosine between the gradients each loss term sends to the shared backbone on the probe items; below 0 the terms pull against each other (PCGrad's conflict).")
    return Section("conflict", "Gradient conflict", intro, columns)


def experts(runs: Sequence[RunData]) -> Section:
    def draw(run: RunData, routed: list[dict]) -> str:
        usage = figure_img(drawings.experts_figure(routed[-1]), f"{run.name}: expert usage at step {routed[-1]['step']}")
        return usage + diag_curves(run, "experts/", "routing entropy / log E per modality", y_range=(0.0, 1.05))

    missing = "no mixture-of-experts block in this run's backbone (or no diagnostics)"
    columns = per_run(runs, lambda r: r.get("experts"), missing, draw)
    intro = note("Share of each modality's routing assignments per expert at the last measurement, and how spread the routing stays (1: even over the experts, 0: one expert).")
    return Section("experts", "Expert usage", intro, columns)


def leakage(runs: Sequence[RunData]) -> Section:
    def draw(run: RunData, leaking: list[dict]) -> str:
        curves = diag_curves(run, "leakage/", "leakage ratio of private queries", y_range=(0.0, 1.0))
        return curves + figure_img(drawings.leakage_figure(leaking[-1]), f"{run.name}: leakage at step {leaking[-1]['step']}")

    leaks = lambda r: drawings.leakage_matrix(r) is not None  # noqa: E731
    columns = per_run(runs, leaks, "no decoupler with private queries or slots in this run (or no diagnostics)", draw)
    last = [next((drawings.leakage_matrix(r) for r in reversed(run.diagnostics) if leaks(r)), None) for run in runs]
    keys = sorted({(name, m) for found in last if found for name in found[0] for m in found[1]})
    footer = ""
    if keys:
        rows = [[esc(f"{name} / {m}"), *(number_cell(_leak(found, name, m)) for found in last)] for name, m in keys]
        footer = table(["map / private type (last measurement)", *(r.name for r in runs)], rows)
    intro = note("Share of a private query's or slot's attention on other modalities' tokens (0: it reads only its own), per decoupler attention map.")
    return Section("leakage", "Leakage", intro, columns, footer)


def _leak(found: Any, name: str, modality: str) -> float | None:
    if not found or name not in found[0] or modality not in found[1]:
        return None
    value = float(found[2][found[0].index(name), found[1].index(modality)])
    return value if math.isfinite(value) else None


def rank(runs: Sequence[RunData]) -> Section:
    title = "effective rank of pooled final states"
    columns = per_run(runs, lambda r: r.get("effective_rank"), "no live diagnostics in this run", lambda run, _: diag_curves(run, "effective_rank/", title))
    intro = note("Effective rank (exp of the singular values' entropy) of each modality's pooled backbone output on the probe: a fall warns of collapse.")
    return Section("rank", "Effective rank", intro, columns)


def samples(runs: Sequence[RunData]) -> Section:
    columns = []
    for run in runs:
        parts = [f"<figure class=\"sample\">{png_img(data, title)}<figcaption>{esc(title)}</figcaption></figure>" for title, data in run.samples.images]
        parts += [audio_player(data, f"{name}: {caption}" if caption else name) for name, caption, data in run.samples.audio]
        columns.append("".join(parts) or note("no samples in this run (samples/ is written by the test evaluation)"))
    intro = note("What the run generated from test captions (samples/), embedded in this page.")
    return Section("samples", "Samples", intro, columns)


def config(runs: Sequence[RunData]) -> Section:
    columns = [f"<pre>{esc(run.config_text)}</pre>" for run in runs]
    footer = ""
    if len(runs) == 2:
        first, second = (flatten(r.config) for r in runs)
        differ = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
        rows = [[esc(k), esc(first.get(k, "-")), esc(second.get(k, "-"))] for k in differ]
        footer = table(["key that differs", runs[0].name, runs[1].name], rows) if rows else note("the two configs are the same")
    return Section("config", "Config", note("The resolved config.yaml: alone it reproduces the run."), columns, footer)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
