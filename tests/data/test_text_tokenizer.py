"""TextTokenizer: round trip, specials, batch vs single encoding, determinism, save/load."""

from __future__ import annotations

import pytest

from polymodal.data.text import TextTokenizer
from polymodal.errors import DataError

CAPTIONS = [f"the number {n} spoken slowly" for n in range(200)] + [
    "a photo of a cat",
    "a photo of a dog",
    "zwei hundert dreißig",
    "三百二十一",
]
HARD_STRINGS = [
    "",
    " ",
    "a photo of a cat",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld ñ ç",
    "三百二十一 and 🎉👩‍👩‍👧 emoji",
    "literal <pad> <bos> <eos> in a caption",
    "\x00\x01 control bytes \x7f",
    "unseen words: xylophone quixotic",
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=320)


def test_special_ids_are_fixed(tokenizer: TextTokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert 259 <= tokenizer.vocab_size <= 320


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip(tokenizer: TextTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_literal_special_text_is_not_a_special_token(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("<eos>")
    assert tokenizer.eos_id not in ids and len(ids) > 1


def test_merges_compress_training_text(tokenizer: TextTokenizer) -> None:
    text = "the number 7 spoken slowly"
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2


def test_batch_equals_single(tokenizer: TextTokenizer) -> None:
    assert tokenizer.encode_batch(HARD_STRINGS) == [tokenizer.encode(t) for t in HARD_STRINGS]


def test_decode_stops_at_eos_and_drops_pad_bos(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("a photo of a cat")
    tail = tokenizer.encode("garbage after the end")
    wrapped = [tokenizer.bos_id, *ids, tokenizer.eos_id, *tail, tokenizer.pad_id, tokenizer.pad_id]
    assert tokenizer.decode(wrapped) == "a photo of a cat"
    assert tokenizer.decode([tokenizer.pad_id, *ids, tokenizer.pad_id]) == "a photo of a cat"


def test_training_is_deterministic(tokenizer: TextTokenizer, tmp_path) -> None:
    again = TextTokenizer.train(CAPTIONS, vocab_size=320)
    a = tokenizer.save(tmp_path / "a.json").read_text()
    b = again.save(tmp_path / "b.json").read_text()
    assert a == b


def test_save_load_round_trip(tokenizer: TextTokenizer, tmp_path) -> None:
    written = tokenizer.save(tmp_path)  # a run folder gets tokenizer.json
    assert written == tmp_path / "tokenizer.json"
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in HARD_STRINGS:
        assert loaded.encode(text) == tokenizer.encode(text)
    # the "literal specials are bytes" behaviour survives a reload
    assert loaded.eos_id not in loaded.encode("<eos>")


def test_load_missing_and_corrupt_name_the_path(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        TextTokenizer.load(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="corrupt") as info:
        TextTokenizer.load(bad)
    assert str(bad) in str(info.value)


def test_too_small_vocab_is_explained() -> None:
    with pytest.raises(ValueError, match="at least 259"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)
