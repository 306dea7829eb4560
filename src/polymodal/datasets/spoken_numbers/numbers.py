"""Numbers as English words, the caption templates of the built-in data, and parsing text back.

Words follow British usage, which says "and" before the last two digits after a hundred or a
thousand ("one hundred and five", "one thousand and seven") and none when those are zero
("seven hundred"). Tens and units are joined by a space, not a hyphen ("forty two"), so a word
tokenizer sees the same units everywhere. ``parse_number`` inverts both the words and the numerals,
so evaluation can read a generated caption back as a number. Last, how the builder draws numbers:
the digit count uniform, then the number uniform at that length, and the held-out numbers.
"""

from __future__ import annotations

import re

import numpy as np

MAX_NUMBER = 999_999  # words are defined up to the thousands

UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
)  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

# {words}: "forty two"; {digits}: "42". Half the templates use words, half numerals, so a model
# must learn that both name the same number.
CAPTION_TEMPLATES = (
    "{words}",
    "{digits}",
    "the number {words}",
    "the number {digits}",
    "a handwritten {words}",
    "a handwritten {digits}",
    "{words} written by hand",
    "{digits} written by hand",
    "a picture of {words}",
    "the digits {digits}",
)

_WORD_VALUES = {word: value for value, word in enumerate(UNITS)}
_WORD_VALUES.update({word: 10 * value for value, word in enumerate(TENS) if word})
_TOKEN = re.compile(r"[a-z]+|\d+")


def _below_hundred(n: int) -> str:
    if n < 20:
        return UNITS[n]
    tens, units = divmod(n, 10)
    return TENS[tens] if units == 0 else f"{TENS[tens]} {UNITS[units]}"


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _below_hundred(rest)
    head = f"{UNITS[hundreds]} hundred"
    return head if rest == 0 else f"{head} and {_below_hundred(rest)}"


def number_to_words(n: int) -> str:
    """English words for ``n`` in 0..999,999, e.g. 42 -> "forty two", 105 -> "one hundred and five".

    Raises:
        ValueError: ``n`` is negative or above MAX_NUMBER.
    """
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number_to_words takes 0..{MAX_NUMBER}, got {n}")
    thousands, rest = divmod(int(n), 1000)
    if thousands == 0:
        return _below_thousand(rest)
    head = f"{_below_thousand(thousands)} thousand"
    if rest == 0:
        return head
    # "one thousand and five" but "one thousand two hundred and five"
    joiner = " and " if rest < 100 else " "
    return f"{head}{joiner}{_below_thousand(rest)}"


def make_caption(n: int, rng: np.random.Generator) -> str:
    """A caption for ``n`` from a template chosen with ``rng`` (one draw)."""
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(words=number_to_words(n), digits=str(n))


def _words_value(words: list[str]) -> int:
    """Value of a run of number words ("one hundred and five" -> 105); "and" is already dropped."""
    total, group = 0, 0
    for word in words:
        if word == "hundred":
            group = max(group, 1) * 100
        elif word == "thousand":
            total += max(group, 1) * 1000
            group = 0
        else:
            group += _WORD_VALUES[word]
    return total + group


def parse_number(text: str) -> int | None:
    """The number a caption names: the first numeral, else the first run of number words.

    Returns None when the text names no number. Inverts ``number_to_words`` and every template in
    ``CAPTION_TEMPLATES`` (checked over all numbers in the tests).
    """
    tokens = _TOKEN.findall(text.lower())
    for token in tokens:
        if token.isdigit():
            return int(token)
    run: list[str] = []
    for token in tokens:
        if token in _WORD_VALUES or token in ("hundred", "thousand"):
            run.append(token)
        elif token == "and" and run:
            continue
        elif run:
            break
    return _words_value(run) if run else None


def spoken_words(text: str) -> str:
    """What a speaker says for ``text``: the words of the number it names ("the number 42" ->
    "forty two"), as a speech synthesiser's front end expands numerals; the text itself, lower-cased
    and stripped, when it names no number or one beyond ``MAX_NUMBER``."""
    n = parse_number(text)
    if n is None or n > MAX_NUMBER:
        return text.strip().lower()
    return number_to_words(n)


def written_digits(text: str) -> str:
    """What a writer writes for ``text``: the numeral of the number it names ("forty two" -> "42");
    the text itself, lower-cased and stripped, when it names none."""
    n = parse_number(text)
    return text.strip().lower() if n is None else str(n)


# ----------------------------------------------------------------------------- drawing numbers

HELDOUT_FRACTION = 0.05  # of the numbers of each length >= 2, never in the training split


def length_range(length: int) -> tuple[int, int]:
    """[low, high) of the numbers with ``length`` digits: 1 -> [0, 10), 2 -> [10, 100), ..."""
    return (0 if length == 1 else 10 ** (length - 1)), 10**length


def choose_heldout(rng: np.random.Generator, max_digits: int) -> np.ndarray:
    """(K,) int64 sorted: HELDOUT_FRACTION of the numbers of each length 2..max_digits."""
    chosen = []
    for length in range(2, max_digits + 1):
        low, high = length_range(length)
        count = max(1, round(HELDOUT_FRACTION * (high - low)))
        chosen.append(low + rng.choice(high - low, size=count, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def draw_numbers(rng: np.random.Generator, count: int, max_digits: int, excluded: np.ndarray) -> np.ndarray:
    """(count,) int64: digit count uniform in 1..max_digits, then a number of that length uniform
    over those not ``excluded`` (redrawn at the same length, so the length stays uniform)."""
    lengths = rng.integers(1, max_digits + 1, size=count)
    numbers = np.zeros(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size:
        bounds = np.array([length_range(int(d)) for d in lengths[todo]]).reshape(-1, 2)  # (n, 2) low, high
        numbers[todo] = bounds[:, 0] + (rng.random(todo.size) * (bounds[:, 1] - bounds[:, 0])).astype(np.int64)
        todo = todo[np.isin(numbers[todo], excluded)]
    return numbers
