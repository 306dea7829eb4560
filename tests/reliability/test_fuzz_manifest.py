"""Fuzzed JSONL manifests: random JSON, wrong types, huge numbers, unicode, missing fields, bytes
that are not UTF-8, paths to broken files. Every line either becomes a sample that loads and
collates, or is skipped and counted; a manifest with no usable line is one DataError."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polymodal.config import DataConfig
from polymodal.data.batch import Sample
from polymodal.data.collate import build_collator
from polymodal.data.manifest import ManifestDataset
from polymodal.data.text import TextTokenizer
from polymodal.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from contract import FAST, FUZZED, SLOW  # noqa: E402

SETTINGS = dict(image_height=16, image_width=24, channels=1, sample_rate=8000, max_audio_seconds=0.25)
MEDIA_NAMES = ("good_png", "tiny_png", "good_wav", "wav_96k_8ch", "bomb_png", "empty", "random", "directory",
               "missing", "truncated_png", "truncated_wav")  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@st.composite
def media_paths(draw) -> str:
    """A path as a manifest may hold it: to a good or broken file, absolute or odd."""
    kind = draw(st.sampled_from(["media", "media", "odd", "text"]))
    if kind == "media":
        return f"@{draw(st.sampled_from(MEDIA_NAMES))}"  # resolved to a real file when written
    if kind == "odd":
        return draw(st.sampled_from(["~no_such_user_xyz/a.png", "x" * 300 + ".png", "a\x00b.png", "", ".", "/", "../../etc"]))
    return draw(st.text(max_size=40))


entries = st.fixed_dictionaries(
    {},
    optional={
        "image": media_paths() | json_values,
        "audio": media_paths() | json_values,
        "text": st.text(max_size=60) | json_values,
        "label": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
        "extra": json_values,
    },
)


@st.composite
def manifest_lines(draw) -> list[bytes]:
    """Lines of a manifest: JSON objects, other JSON, broken JSON, raw bytes, deep nesting, BOMs."""
    lines = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        kind = draw(st.sampled_from(["entry", "entry", "entry", "json", "cut", "bytes", "deep", "bigint", "blank"]))
        if kind == "entry":
            text = json.dumps(draw(entries), ensure_ascii=draw(st.booleans()))
        elif kind == "json":
            text = json.dumps(draw(json_values))
        elif kind == "cut":
            whole = json.dumps(draw(entries))
            text = whole[: draw(st.integers(min_value=0, max_value=len(whole)))]
        elif kind == "deep":
            depth = draw(st.integers(min_value=100, max_value=100_000))
            text = '{"text": ' + "[" * depth + "]" * depth + "}"
        elif kind == "bigint":
            text = '{"text": "big", "label": ' + "9" * draw(st.integers(min_value=19, max_value=6000)) + "}"
        elif kind == "blank":
            text = " " * draw(st.integers(min_value=0, max_value=3))
        else:
            lines.append(draw(st.binary(max_size=60)).replace(b"\n", b"").replace(b"\r", b""))
            continue
        line = text.encode("utf-8", errors="surrogatepass")
        if draw(st.booleans()) and not lines:
            line = "\ufeff".encode() + line
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def collator():
    tokenizer = TextTokenizer.train(["seven", "forty two", "a caption"] * 10, vocab_size=300)
    config = DataConfig(sample_rate=8000, image_height=16, image_width=24, max_audio_seconds=0.25)
    return build_collator(tokenizer, config)


def check_manifest(lines: list[bytes], media: dict[str, Path], collator) -> None:
    FUZZED["manifest"] += 1
    resolved = [line.replace(b'"@', b'"').replace(b"@", b"") for line in lines]
    for name in MEDIA_NAMES:  # "@good_png" -> the absolute path of that file
        resolved = [line.replace(name.encode(), str(media[name]).encode()) if b"@" + name.encode() in src else line
                    for line, src in zip(resolved, lines)]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(resolved) + b"\n")
        try:
            dataset = ManifestDataset(path, **SETTINGS)
        except DataError as exc:
            assert str(path) in str(exc)
            assert "no usable line" in str(exc) or "none of its media files exists" in str(exc)
            return
        nonblank = sum(bool(line.strip()) for line in resolved)
        assert len(dataset) + dataset.num_skipped == nonblank
        samples = [dataset[i] for i in range(len(dataset))]
        failed = sum(sample is None for sample in samples)
        assert dataset.num_skipped == nonblank - len(dataset) + failed
        for sample in samples:
            assert sample is None or isinstance(sample, Sample)
        batch = collator(samples)
        assert batch.size == len(samples) - failed
        for values in batch.inputs.values():
            assert values.shape[0] == batch.size and values.isfinite().all()


@FAST
@given(lines=manifest_lines())
def test_fuzzed_manifests_skip_and_count(lines, media, collator):
    check_manifest(lines, media, collator)


@pytest.mark.slow
@SLOW
@given(lines=manifest_lines())
def test_fuzzed_manifests_skip_and_count_many(lines, media, collator):
    check_manifest(lines, media, collator)


def test_hand_picked_lines_are_skipped_with_their_reason(tmp_path, media):
    lines = [
        b'{"text": "kept"}',
        b'{"text": "\\ud800"}',  # a lone surrogate
        b'{"text": "big", "label": 9223372036854775808}',  # 2**63
        b'{"text": "big", "label": ' + b"9" * 5000 + b"}",  # over Python's digit limit
        b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"text": "\xff\xfe"}',  # not UTF-8
        b'{"image": "~no_such_user_xyz/a.png"}',
        b'{"text": "a\xe2\x80\xa8b"}',  # U+2028 inside a string: one line, not two
        b'{"image": "' + str(media["good_png"]).encode() + b'"}',  # one media file exists: a missing one is a skip
    ]
    path = tmp_path / "m.jsonl"
    path.write_bytes("\ufeff".encode() + b"\n".join(lines))
    dataset = ManifestDataset(path, **SETTINGS)
    assert [e.get("text") for e in dataset.entries] == ["kept", None, "a\u2028b", None]
    reasons = list(dataset.skipped.values())
    assert reasons == [
        "'text' is not valid Unicode (a lone surrogate)",
        "'label' 9223372036854775808 does not fit in a 64-bit integer",
        reasons[2],
        "JSON nested too deeply",
        "not UTF-8 text (invalid start byte at byte 10)",
    ]
    assert reasons[2].startswith("not usable JSON (Exceeds the limit")
    assert dataset[1] is None and dataset.num_skipped == 6  # "~no_such_user_xyz" is read as written: missing
