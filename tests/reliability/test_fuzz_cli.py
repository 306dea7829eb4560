"""Fuzzed command lines for `generate`, `eval`, `embed` and `search` against tiny runs trained once
per session: missing, empty or wrong files, folders for files, empty or odd text, a modality the
run lacks, the wrong kind of run, absurd numbers. Each ends with status 0 and the promised output,
or status 2 and one line; never a traceback."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from contract import CLI_FAST, CLI_SLOW, FUZZED, assert_contract, manifest_of, run_cli  # noqa: E402

MEDIA = ("good_png", "tiny_png", "good_wav", "wav_96k_8ch", "bomb_png", "truncated_png", "truncated_wav", "empty",
         "random", "directory", "missing")  # fmt: skip
RUNS = ("tiny", "clip", "missing", "file", "empty_dir")
# Values of each option's type (out of range too), and a few argparse refuses.
INTS = ("0", "1", "3", "-1", "1000000", "18446744073709551616")
FLOATS = ("0", "0.8", "1", "-1", "nan", "inf", "-inf", "1e308", "1e-30")
NOT_NUMBERS = ("abc", "", "1,5")
MODALITIES = ("image", "audio", "text")
ODD_MODALITIES = ("video", "IMAGE", "")
odd_text = st.text(max_size=40) | st.sampled_from(["", " ", "forty two", "9" * 400, "\u202e\x00", "seven " * 200])


@pytest.fixture(scope="module")
def places(tiny_run, clip_run, media, tmp_path_factory) -> dict[str, str]:
    """Runs, media and index files by name, as command-line strings."""
    folder = tmp_path_factory.mktemp("cli_fuzz")
    (folder / "empty_run").mkdir()
    found = {"tiny": tiny_run, "clip": clip_run, "missing": folder / "no_run", "file": media["good_png"],
             "empty_dir": folder / "empty_run", **media}  # fmt: skip
    index = folder / "index.safetensors"
    manifest = manifest_of(folder, [{"image": str(media["good_png"]), "text": "seven"}, {"text": "forty two"}])
    assert run_cli("embed", str(clip_run), "--manifest", str(manifest), "--modality", "image", "--out", str(index)).status == 0
    found["index"] = index
    found["other_keys"] = folder / "other.safetensors"
    save_file({"weights": torch.zeros(3)}, str(found["other_keys"]))
    found["wrong_dims"] = folder / "dims.safetensors"
    save_file({"embeddings": torch.zeros(2, 7), "ids": torch.arange(2)}, str(found["wrong_dims"]), {"paths": "[1, 2]"})
    found["bad_paths"] = folder / "paths.safetensors"
    save_file({"embeddings": torch.zeros(2, 32), "ids": torch.arange(3)}, str(found["bad_paths"]), {"paths": "{not json"})
    found["manifest"] = manifest
    return {name: str(path) for name, path in found.items()}


def _numbers(flag: str, values: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    """No option (3 in 10), a value of its type (6 in 10), or something argparse refuses (1 in 10),
    so that most cases get past the parser to the code behind it."""
    kinds = st.sampled_from(["none"] * 3 + ["valid"] * 6 + ["bad"])
    pools = {"none": st.just([]), "valid": st.sampled_from(values).map(lambda value: [flag, value]),
             "bad": st.sampled_from(NOT_NUMBERS).map(lambda value: [flag, value])}  # fmt: skip
    return kinds.flatmap(pools.__getitem__)


modalities = st.one_of(st.sampled_from(MODALITIES), st.sampled_from(MODALITIES), st.sampled_from(ODD_MODALITIES),
                       st.text(max_size=6))  # fmt: skip


@st.composite
def generate_args(draw, places_names=RUNS) -> list:
    source = draw(modalities)
    value = draw(odd_text) if source == "text" or draw(st.booleans()) else ("@", draw(st.sampled_from(MEDIA)))
    args = ["generate", ("@", draw(st.sampled_from(places_names))), "--from", source, value,
            "--to", draw(modalities)]  # fmt: skip
    for flag, values in (("--temperature", FLOATS), ("--top-k", INTS), ("--top-p", FLOATS), ("--seed", INTS)):
        args += draw(_numbers(flag, values))
    out = draw(st.sampled_from([None, "file.png", "file.wav", "new/deep/out.png", "@directory", "@good_png"]))
    if out is not None:
        args += ["--out", ("@", out[1:]) if out.startswith("@") else ("tmp", out)]
    return args


@st.composite
def eval_args(draw) -> list:
    args = ["eval", ("@", draw(st.sampled_from(RUNS)))]
    args += draw(st.just([]) | st.sampled_from(["val", "test", "train", ""]).map(lambda s: ["--split", s]))
    args += draw(st.sampled_from([["--limit", "2"], ["--limit", "0"], ["--limit", "-3"], ["--limit", "x"]]))
    return args


@st.composite
def embed_args(draw) -> list:
    manifest = draw(st.sampled_from(["manifest", "manifest", "random", "empty", "directory", "missing", "good_png"]))
    args = ["embed", ("@", draw(st.sampled_from(RUNS))), "--manifest", ("@", manifest),
            "--modality", draw(modalities), "--out",
            draw(st.sampled_from([("tmp", "i.safetensors"), ("tmp", "a/b/i.safetensors"), ("@", "directory")]))]  # fmt: skip
    return args + draw(_numbers("--batch-size", INTS))


@st.composite
def search_args(draw) -> list:
    index = draw(st.sampled_from(["index", "index", "other_keys", "wrong_dims", "bad_paths", "random", "empty",
                                  "good_png", "missing", "directory"]))  # fmt: skip
    query = draw(st.sampled_from(["--text", "--image", "--audio"]))
    value = draw(odd_text) if query == "--text" else ("@", draw(st.sampled_from(MEDIA)))
    return ["search", ("@", draw(st.sampled_from(RUNS))), ("@", index), query, value, *draw(_numbers("--top-k", INTS))]


def _resolve(args: list, places: dict[str, str], folder: str) -> list[str]:
    """("@", name) -> that place; ("tmp", name) -> a path in this case's own folder."""
    out = []
    for arg in args:
        if isinstance(arg, tuple):
            kind, name = arg
            arg = places[name] if kind == "@" else str(Path(folder) / name)
        out.append(arg)
    return out


def check_command(args: list, places: dict[str, str]) -> None:
    command = args[0]
    FUZZED[f"cli {command}"] += 1
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):  # default --out files land here
        argv = _resolve(args, places, folder)
        result = run_cli(*argv)
        assert_contract(result, command)
        if result.status != 0:
            return
        if command == "generate" and argv[argv.index("--to") + 1] != "text":
            written = Path(result.out.strip().removeprefix("wrote "))
            assert written.is_file() and written.stat().st_size > 0
        elif command == "embed":
            assert Path(argv[argv.index("--out") + 1]).is_file()
        elif command == "search":
            assert result.out.startswith("top ")


@CLI_FAST
@given(args=generate_args())
def test_fuzzed_generate(args, places):
    check_command(args, places)


@CLI_FAST
@given(args=embed_args() | search_args())
def test_fuzzed_embed_and_search(args, places):
    check_command(args, places)


@pytest.mark.slow
@CLI_SLOW
@given(args=generate_args() | embed_args() | search_args())
def test_fuzzed_generate_embed_search_many(args, places):
    check_command(args, places)


@pytest.mark.slow  # eval scores the tiny run's test split: about a second a case
@CLI_FAST
@given(args=eval_args())
def test_fuzzed_eval(args, places):
    check_command(args, places)


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "@empty_dir"],
        ["eval", "@tiny", "--limit", "0"],
        ["generate", "@clip", "--from", "text", "seven", "--to", "image"],
        ["generate", "@tiny", "--from", "text", "", "--to", "audio"],
        ["generate", "@tiny", "--from", "text", "seven", "--to", "image", "--top-k", "1000000"],
        ["generate", "@tiny", "--from", "image", "@good_png", "--to", "text", "--temperature", "nan"],
        ["generate", "@tiny", "--from", "image", "@good_wav", "--to", "text"],
        ["generate", "@tiny", "--from", "audio", "@good_png", "--to", "text"],
        ["generate", "@tiny", "--from", "text", "seven", "--to", "audio", "--out", "@directory"],
        ["embed", "@clip", "--manifest", "@manifest", "--modality", "image", "--out", "@directory"],
        ["embed", "@clip", "--manifest", "@manifest", "--modality", "image", "--out", "x", "--batch-size", "0"],
        ["embed", "@clip", "--manifest", "@manifest", "--modality", "image", "--out", "x", "--batch-size", str(2**64)],  # found by fuzzing
        ["embed", "@tiny", "--manifest", "@manifest", "--modality", "image", "--out", "x"],
        ["search", "@clip", "@wrong_dims", "--text", "seven"],
        ["search", "@clip", "@bad_paths", "--text", "seven"],
        ["search", "@clip", "@index", "--image", "@bomb_png"],
        ["search", "@clip", "@index", "--text", ""],
    ],
)
def test_hand_picked_commands(args, places):
    check_command([("@", a[1:]) if a.startswith("@") else a for a in args], places)
