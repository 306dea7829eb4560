"""The run report: every section for one run and for two side by side, figures held to their
preset's lines, diagnostics drawn from what the live hook writes, samples embedded, a run with
nothing but a config still reported; and the page opened in headless Chromium, which must decode
every image and audio clip, fetch nothing and log no error."""

from __future__ import annotations

import html
import html.parser
import io
import json
import math
import re

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

from browser import find_chromium, open_page
from polymodal.cli.main import main
from polymodal.config import load_config, to_dict
from polymodal.diagnostics import GradientConflict, Leakage, usage_from_counts
from polymodal.diagnostics.live import LiveMeasurement
from polymodal.modality import Modality
from polymodal.report.build import write_report
from polymodal.report.lines import LINES, lines_for, preset_of

SECTIONS = ["overview", "losses", "figures", "cka", "conflict", "experts", "leakage", "rank", "samples", "config"]
STEPS = (50, 100, 150)
LOSSES = ("image_to_text", "audio_to_text", "contrastive_image_text")
FIGURES = {  # default preset lines: image->text met, audio->text below, both R@1 met, text->image met, text->audio below
    "image_to_text": {"exact": 0.9}, "audio_to_text": {"exact": 0.8},
    "retrieval_image_to_text": {"R@1": 0.75}, "retrieval_text_to_image": {"R@1": 0.7},
    "text_to_image": {"probe_correct": 0.71}, "text_to_audio": {"probe_correct": 0.2},
    "train": {"step": 150, "wall_seconds": 300.0, "samples_per_second": 32.0},
}  # fmt: skip


def measurement(step: int, leakage: float) -> LiveMeasurement:
    """A measurement as ``diagnostics/live.py`` makes it, with values chosen here."""
    layers = ("L0", "L1", "L2")
    n = 3 * len(layers)
    generator = torch.Generator().manual_seed(step)
    noise = torch.rand(n, n, generator=generator, dtype=torch.float64)
    cka = ((noise + noise.T) / 2).fill_diagonal_(1.0)  # (9, 9) symmetric, ones on the diagonal
    cosine = torch.tensor([[1.0, -0.4, 0.2], [-0.4, 1.0, 0.1], [0.2, 0.1, 1.0]], dtype=torch.float64)
    counts = torch.tensor([[6.0, 2, 8, 0, 0], [5, 3, 0, 8, 0], [4, 4, 0, 0, 8]], dtype=torch.float64)  # (M, E)
    per_type = {m: leakage for m in Modality}
    leak = Leakage(mass=torch.zeros(3, 3), per_slot=torch.full((3,), leakage), per_type=per_type, shared_mass={})
    return LiveMeasurement(
        16, tuple(Modality), layers, cka, {m: 5.0 + step / 100 for m in Modality},
        GradientConflict(LOSSES, cosine, torch.ones(3)), {1: usage_from_counts(counts)}, {"slots": leak},
    )  # fmt: skip


def write_run(folder, *, lr: float = 1e-3, leakage: float = 0.3, complete: bool = True):
    """A run folder as ``polymodal train`` leaves it (default preset), or only its config and first losses."""
    folder.mkdir(parents=True)
    config = to_dict(load_config(["default"], [f"train.lr={lr}", f"run_dir={folder}"]))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    entries = [{"step": s, "split": "train", "loss": 3.0 / s, **{f"loss/{n}": 1.0 / s for n in LOSSES}, "lr": lr, "grad_norm": 2.0}
               for s in range(10, STEPS[-1] + 1, 10)]  # fmt: skip
    if not complete:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries[:2]))
        return folder
    records = []
    for step in STEPS:
        result = measurement(step, leakage)
        entries.append({"step": step, "split": "val", "image_to_text/exact": 0.3 * step / 50})
        entries.append({"step": step, "split": "diag", **{k: (v if math.isfinite(v) else "nan") for k, v in result.scalars().items()}})
        records.append({"step": step, "time": 0.0, "seconds": 1.5, **result.record()})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (folder / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "eval.json").write_text(json.dumps({"figures": FIGURES, "config": config}))
    samples = folder / "samples"
    samples.mkdir()
    Image.fromarray((np.arange(32 * 96) % 251).reshape(32, 96).astype(np.uint8)).save(samples / "text_to_image.png")
    for i in range(2):
        tone = 0.3 * np.sin(2 * np.pi * 440 * (i + 1) * np.arange(3200) / 16000)
        soundfile.write(samples / f"text_to_audio_{i}.wav", tone, 16000)
    (samples / "captions.txt").write_text("text_to_image.png #0: forty two\ntext_to_audio_0.wav: seven\ntext_to_audio_1.wav: the digits 8\n")
    return folder


class Elements(html.parser.HTMLParser):
    """Sections, the runs' columns in each, and every src / href of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.columns: dict[str, int] = {}
        self.sources: list[str] = []
        self.tags: dict[str, int] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag == "div" and attrs.get("class") == "run":
            self.columns[self.sections[-1]] = self.columns.get(self.sections[-1], 0) + 1
        self.sources += [attrs[k] for k in ("src", "href") if k in attrs]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base = write_run(root / "base", leakage=0.3)
    decoupled = write_run(root / "decoupled", lr=5e-4, leakage=0.05)
    bare = write_run(root / "bare", complete=False)
    return {
        "one": write_report([base], root / "one.html").read_text(),
        "two": write_report([base, decoupled], root / "two.html").read_text(),
        "bare": write_report([bare], root / "bare.html").read_text(),
        "paths": {"one": root / "one.html", "two": root / "two.html", "bare": root / "bare.html"},
    }


def row(page: str, first_cell: str) -> str:
    """The text of the table row whose first cell is ``first_cell``."""
    match = re.search(rf"<tr><td>{re.escape(html.escape(first_cell))}</td>(.*?)</tr>", page)
    assert match, f"no row {first_cell!r}"
    return " ".join(re.sub(r"<[^>]+>", " ", match.group(1)).split())


def test_one_run_has_every_section_its_lines_and_embeds_everything(reports):
    page = reports["one"]
    found = Elements(page)
    assert found.sections == SECTIONS and set(found.columns.values()) == {1}
    assert found.tags.get("script", 0) == 0 and found.tags["audio"] == 2
    assert all(s.startswith(("data:image/png;base64,", "data:audio/wav;base64,", "#")) for s in found.sources)
    assert found.tags["img"] >= 10  # losses, val, CKA curves and heatmaps, conflict x2, experts x2, leakage x2, rank, sample
    verdicts = {line.figure: row(page, line.label) for line in LINES["default"]}
    assert "90.0% met" in verdicts["image_to_text/exact"] and "80.0% below" in verdicts["audio_to_text/exact"]
    assert "70.0% met" in verdicts["retrieval_text_to_image/R@1"] and "20.0% below" in verdicts["text_to_audio/probe_correct"]
    assert "3 measurements of 16 items, 4.5 s, 1.5% of training time" in page
    assert "seven" in page and "the digits 8" in page  # the clips' captions


def test_two_runs_sit_side_by_side_with_their_differences(reports):
    page = reports["two"]
    found = Elements(page)
    assert found.sections == SECTIONS and set(found.columns.values()) == {2}
    assert "base vs decoupled" in page
    assert "0.0005" in row(page, "train.lr") and "0.001" in row(page, "train.lr")
    leak = row(page, "slots / text")  # the decoupled run leaks less, in the same report
    assert [float(v) for v in re.findall(r"\d\.\d+", leak)] == [0.3, 0.05]


def test_a_run_with_only_a_config_and_first_losses_is_still_reported(reports):
    page = reports["bare"]
    assert Elements(page).sections == SECTIONS
    for message in ("no eval.json yet", "no live diagnostics in this run", "no samples in this run", "no gradient conflict measured"):
        assert message in page


def test_lines_follow_the_preset_a_run_was_made_from():
    def resolved(name, *overrides):
        return yaml.safe_load(yaml.safe_dump(to_dict(load_config([name], list(overrides))), sort_keys=False))

    assert preset_of(resolved("default", "train.steps=10", "seed=3")) == "default"
    assert preset_of(resolved("tiny")) == "tiny" and lines_for("tiny") == ()
    assert preset_of(resolved("default", "model.dim=64")) is None
    image_to_text = lines_for("default")[0]
    assert image_to_text.met({"image_to_text/exact": 0.85}) and not image_to_text.met({"image_to_text/exact": 0.849})
    assert image_to_text.met({}) is None


def test_the_command_writes_the_page_and_refuses_a_folder_that_is_no_run(reports, tmp_path, capsys):
    base = reports["paths"]["one"].parent / "base"
    assert main(["report", str(base), "--out", str(tmp_path / "r.html"), "--lines", "default"]) == 0
    assert Elements((tmp_path / "r.html").read_text()).sections == SECTIONS
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["report", str(base), "--lines", "nosuch"]) == 2


def test_the_page_opens_in_a_real_browser(reports, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium to open the report in: apt-get install -y chromium (Debian's package)")
    for name, clips in (("two", 4), ("bare", 0)):
        seen = open_page(reports["paths"][name], chromium)
        assert seen.errors == [], seen.errors
        assert seen.sections == SECTIONS and seen.scripts == 0
        assert seen.images and all(image["decoded"] for image in seen.images), [i["alt"] for i in seen.images if not i["decoded"]]
        assert len(seen.audio) == clips
        assert all(clip["ready"] >= 1 and clip["error"] is None and clip["duration"] == pytest.approx(0.2) for clip in seen.audio)
        shot = Image.open(io.BytesIO(seen.screenshot))
        assert shot.size == (1400, seen.height) and np.asarray(shot.convert("L")).std() > 10  # a drawn page, not blank


@pytest.mark.slow
def test_a_trained_run_with_live_diagnostics_reports_its_cross_modal_cka(tmp_path, monkeypatch):
    """The whole path: `polymodal train` with diagnostics on, `polymodal report`, Chromium."""
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", "data.options.num_samples=200", "train.steps=10", "train.diagnostics.every=5",
            "train.progress=false", "tokenizer_train.progress=false"]  # fmt: skip
    assert main(["train", "--config", "tiny", *args]) == 0
    records = [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10] and records[0]["layers"] == ["L0", "L1", "L2"]
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert Elements(page).sections == SECTIONS and 'alt="run: cross-modal CKA per layer"' in page
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium to open the report in: apt-get install -y chromium (Debian's package)")
    seen = open_page(run_dir / "report.html", chromium)
    assert seen.errors == [] and seen.sections == SECTIONS and all(image["decoded"] for image in seen.images)
    assert len(seen.audio) == 8 and all(clip["error"] is None for clip in seen.audio)
