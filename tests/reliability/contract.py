"""Shared pieces of the reliability tests: fuzzing budgets, the CLI contract, and writers of good
and broken media files (the fixtures that use them are in conftest.py).

The contract every fuzzed case must meet: a bad sample is skipped and counted, a bad command ends
with status 2 and exactly one line on stderr (``polymodal <command>: error: ...``), and nothing
escapes as a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile
from hypothesis import HealthCheck, settings
from PIL import Image

from polymodal.cli.main import main

# Examples per fuzz target: a few seconds each by default, many more under `-m slow`.
FAST_EXAMPLES = 30
SLOW_EXAMPLES = 400
CLI_FAST_EXAMPLES = 12  # a CLI case loads a run (about 0.3 s)
CLI_SLOW_EXAMPLES = 150

FAST = settings(max_examples=FAST_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI_FAST = settings(max_examples=CLI_FAST_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI_SLOW = settings(max_examples=CLI_SLOW_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Cases run per target in this session, printed at the end (the figures of the reliability report).
FUZZED: collections.Counter = collections.Counter()
EXIT_USAGE = 2

TINY_ANY_TO_ANY = [
    "--config", "tiny", "train.steps=4", "tokenizer_train.steps=2", "data.options.num_samples=200",
    "train.progress=false", "tokenizer_train.progress=false",
]  # fmt: skip
TINY_CLIP = [
    "--config", "clip", "train.steps=2", "train.batch_size=8", "data.options.num_samples=200", "train.progress=false",
    "model.dim=32", "model.backbone.num_layers=1", "model.backbone.num_heads=2", "model.encoders.image.num_stages=3",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CliResult:
    status: int
    out: str
    err: str


def run_cli(*argv: str) -> CliResult:
    """``polymodal ARGV`` in this process, its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse's own errors
            status = exc.code if isinstance(exc.code, int) else 1
    return CliResult(status, out.getvalue(), err.getvalue())


def assert_contract(result: CliResult, command: str) -> None:
    """Status 0, or status 2 with one line naming the command and the problem."""
    assert result.status in (0, EXIT_USAGE), result
    assert "Traceback" not in result.err
    if result.status == EXIT_USAGE:
        lines = result.err.strip().splitlines()
        assert len(lines) == 1, result.err
        assert lines[0].startswith(f"polymodal {command}: error: ") or lines[0].startswith("polymodal: error: "), lines


# ----------------------------------------------------------------------------- media writers


def write_png(path: Path, *, width: int = 96, height: int = 32, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_wav(path: Path, *, seconds: float = 0.5, sample_rate: int = 16000, channels: int = 1) -> Path:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)[:, None] * np.ones((1, channels))  # (T, channels)
    soundfile.write(path, wave.astype(np.float32), sample_rate, subtype="FLOAT")
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_header_only(path: Path, *, width: int, height: int) -> Path:
    """A grey PNG declaring ``width`` x ``height`` with almost no pixel data: what a decompression
    bomb looks like before it is decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def manifest_of(folder: Path, entries: list[dict], name: str = "m.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path
