"""Number words, caption templates, and parsing captions back to numbers."""

import numpy as np
import pytest

from polymodal.datasets.spoken_numbers.numbers import CAPTION_TEMPLATES, MAX_NUMBER, make_caption, number_to_words, parse_number, spoken_words, written_digits


@pytest.mark.parametrize(
    "number, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (42, "forty two"),
        (100, "one hundred"),
        (105, "one hundred and five"),
        (700, "seven hundred"),
        (999, "nine hundred and ninety nine"),
        (1005, "one thousand and five"),
        (1200, "one thousand two hundred"),
        (20_017, "twenty thousand and seventeen"),
        (999_999, "nine hundred and ninety nine thousand nine hundred and ninety nine"),
    ],
)
def test_words_by_hand(number, words):
    assert number_to_words(number) == words


@pytest.mark.parametrize("number", [-1, MAX_NUMBER + 1])
def test_words_out_of_range(number):
    with pytest.raises(ValueError, match="0..999999"):
        number_to_words(number)


def test_parse_inverts_words():
    numbers = list(range(0, 10_000)) + list(np.random.default_rng(0).integers(0, MAX_NUMBER + 1, 2000))
    for n in numbers:
        assert parse_number(number_to_words(int(n))) == n, number_to_words(int(n))


def test_every_template_names_its_number():
    for template in CAPTION_TEMPLATES:
        for n in (0, 5, 10, 19, 42, 100, 105, 310, 999):
            caption = template.format(words=number_to_words(n), digits=str(n))
            assert parse_number(caption) == n, caption


def test_templates_mix_words_and_numerals():
    assert any("{words}" in t for t in CAPTION_TEMPLATES)
    assert any("{digits}" in t for t in CAPTION_TEMPLATES)
    rng = np.random.default_rng(0)
    captions = {make_caption(42, rng) for _ in range(200)}
    assert len(captions) == len(CAPTION_TEMPLATES)  # every template gets picked
    assert "forty two" in captions and "42" in captions


def test_caption_follows_rng():
    a = [make_caption(n, np.random.default_rng(3)) for n in range(50)]
    b = [make_caption(n, np.random.default_rng(3)) for n in range(50)]
    assert a == b


def test_parse_without_number():
    assert parse_number("a handwritten digit") is None
    assert parse_number("") is None


def test_spoken_words_and_written_digits_give_the_number_a_caption_names():
    rng = np.random.default_rng(0)
    for n in [0, 7, 42, 105, 999, 1007, 999_999]:
        assert spoken_words(make_caption(n, rng)) == number_to_words(n)
        assert written_digits(make_caption(n, rng)) == str(n)
    assert written_digits(" No Number ") == "no number"
    assert spoken_words("  Hello There ") == "hello there"  # no number: the text itself
    assert spoken_words("1000000") == "1000000"  # beyond the words this module knows
