"""Byte-level BPE text tokenizer trained on the training captions with Hugging Face ``tokenizers``.

Byte-level BPE as in GPT-2 (Radford et al. 2019, Language Models are Unsupervised Multitask
Learners): text is read as UTF-8 bytes, each byte mapped to a printable symbol, and BPE merges
(Sennrich et al. 2016, Neural Machine Translation of Rare Words with Subword Units,
arXiv:1508.07909) are learnt on top; digits are split first, one token each. Since all 256 byte symbols are in the vocabulary, every string
encodes without an unknown token and ``decode(encode(s)) == s`` for any valid Unicode string.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from polymodal.errors import DataError

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
# Special tokens come first in the trainer's vocabulary, so their ids are fixed: pad 0, bos 1, eos 2.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
NUM_BYTE_SYMBOLS = 256  # the byte-level alphabet: every byte value has its own base token
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_SYMBOLS  # a BPE with no merge at all
TOKENIZER_FILENAME = "tokenizer.json"  # the file name inside a run folder


def _resolve_file(path: str | Path) -> Path:
    """A run folder means the tokenizer.json inside it."""
    path = Path(path)
    return path / TOKENIZER_FILENAME if path.is_dir() else path


class TextTokenizer:
    """Byte-level BPE with ``<pad>``, ``<bos>``, ``<eos>`` at ids 0, 1, 2.

    ``encode`` returns the content ids only; the collator adds ``bos``/``eos`` and padding. Special
    tokens typed inside a caption (the literal text ``"<pad>"``) are encoded as ordinary bytes, so a
    user's text can never inject a control token.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap a ``tokenizers.Tokenizer``; use ``train`` or ``load`` to make one."""
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise DataError(
                    f"tokenizer has {token!r} at id {tokenizer.token_to_id(token)}, expected {expected_id}; "
                    "train it with TextTokenizer.train"
                )
        # Captions are data, never control: "<eos>" inside a caption is split into bytes.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> "TextTokenizer":
        """Learn BPE merges on ``texts``. Deterministic for the same texts in the same order.

        Args:
            texts: training captions.
            vocab_size: the largest vocabulary wanted, specials and the 256 byte symbols included.
                A small corpus may stop with fewer merges; read ``vocab_size`` afterwards.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                f"({len(SPECIAL_TOKENS)} special tokens + {NUM_BYTE_SYMBOLS} byte symbols)"
            )
        tokenizer = Tokenizer(models.BPE())
        # Every digit is its own token (as in LLaMA, Touvron et al. 2023, arXiv:2302.13971): merged
        # digit pairs ("3" + "48", " 90" + "7") make reading a numeral a lookup per pair instead of
        # a transcription per digit, and numbers never seen in training get unseen tokens.
        # add_prefix_space=False keeps the round trip exact (no space is invented before the text).
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all bytes, even unseen ones
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        logger.info("trained a byte-level BPE with %d tokens", tokenizer.get_vocab_size())
        return cls(tokenizer)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON to ``path`` (a file, or a folder that gets ``tokenizer.json``).

        Returns:
            The file written.
        """
        file = _resolve_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(file))
        return file

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        """Read a tokenizer written by ``save`` (a tokenizer.json, or the run folder holding one)."""
        file = _resolve_file(path)
        if not file.is_file():
            raise DataError(f"tokenizer file {file} does not exist; train one with TextTokenizer.train and save it")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable JSON
            raise DataError(f"tokenizer file {file} is corrupt ({exc}); delete it and train again") from None
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index(PAD_TOKEN)

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS.index(BOS_TOKEN)

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no bos/eos)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode``, and each token's [start, end) characters in ``text``."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts, in parallel inside ``tokenizers``."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first ``eos``, drops ``pad`` and ``bos``."""
        content = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                content.append(i)
        return self._tokenizer.decode(content, skip_special_tokens=False)
