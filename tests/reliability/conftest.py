"""Fixtures of the reliability tests: tiny runs trained once per test session, good and broken
media files; and the count of fuzzed cases printed at the end of a run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # contract.py, shared by the tests beside it
from contract import FUZZED, TINY_ANY_TO_ANY, TINY_CLIP, write_png, write_png_header_only, write_wav  # noqa: E402

from polymodal.cli.main import main  # noqa: E402


def pytest_terminal_summary(terminalreporter) -> None:
    if FUZZED:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(FUZZED.items()))
        terminalreporter.write_line(f"fuzzed cases: {counts} ({sum(FUZZED.values())} in all)")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One dataset cache for the session (the path tests/cli uses, so the data is built once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYMODAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_cache) -> Path:
    """An any-to-any run (every task) trained for 4 steps, once per session."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY_ANY_TO_ANY, f"run_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory, data_cache) -> Path:
    """A CLIP run (image, audio and text towers) trained for 2 steps, once per session."""
    run_dir = tmp_path_factory.mktemp("runs") / "clip"
    assert main(["train", *TINY_CLIP, f"run_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Good and broken media files, by name."""
    folder = tmp_path_factory.mktemp("media")
    files = {
        "good_png": write_png(folder / "good.png"),
        "tiny_png": write_png(folder / "one.png", width=1, height=1),
        "good_wav": write_wav(folder / "good.wav"),
        "wav_96k_8ch": write_wav(folder / "hifi.wav", sample_rate=96000, channels=8),
        "bomb_png": write_png_header_only(folder / "bomb.png", width=20_000, height=20_000),
        "empty": folder / "empty.bin",
        "random": folder / "random.bin",
        "directory": folder / "a_folder",
        "missing": folder / "missing.png",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(2048))
    files["directory"].mkdir()
    good = files["good_png"].read_bytes()
    files["truncated_png"] = folder / "truncated.png"
    files["truncated_png"].write_bytes(good[: len(good) // 2])
    wav = files["good_wav"].read_bytes()
    files["truncated_wav"] = folder / "truncated.wav"
    files["truncated_wav"].write_bytes(wav[:30])
    return files
