"""A pretrained Hugging Face speech encoder (wav2vec 2.0, HuBERT, or Whisper's encoder) loaded from a
local folder, reading raw waveforms through the model's own feature extractor, done in torch.

Unlike the library's other audio encoders, which read log-mel frames, these read the waveform:
the class declares ``input_kind = "waveform"`` and ``forward`` takes (B, T) samples with a (B, T)
mask at ``sample_rate``, which must be the model's rate (16 kHz for all three families: set
``data.sample_rate`` to it; nothing is resampled here).

- wav2vec 2.0 / HuBERT: each clip is normalised to zero mean and unit variance over its real
  samples (the feature extractor's ``do_normalize``), padding set to 0. The attention mask is
  passed only to the models whose feature extractor asks for one (the layer-norm "large"/"lv60"
  ones). The group-norm base models were trained without one, and in a padded batch their group
  norm and attention would read the padding (Hugging Face feeds them zero padding and accepts
  the shift); here they run one clip at a time at its own length instead, so a clip's tokens are
  the same in any batch. That costs B model calls per batch: 1.5-1.8x the batched call on CPU
  (benchmarks/bench_hf_audio_per_clip.py), likely more on a GPU; ``batch_padding=True`` takes
  Hugging Face's batched zero-padded call instead. The CNN's frame count
  per conv, floor((L - kernel) / stride) + 1, gives the output mask (20 ms frames at 16 kHz).
  Hugging Face's own SpecAugment-style masking inside the model is switched off: it draws from
  numpy's global generator, so a resumed run would not replay it (``data/augment.py`` is ours).
- Whisper: the clip is zero-padded to the model's 30 s window and turned into Whisper's log-mel
  (periodic Hann STFT, power, the extractor's Slaney mel filters, log10, floor at max - 8, then
  (x + 4) / 4), computed batched in torch. The encoder always reads the full window; frame f is
  real if f * hop < T, and the encoder halves that count (stride-2 conv), giving 20 ms tokens.
  Tokens past the batch's longest real clip are cut off, so a 2 s clip yields ~100 tokens, not 1500.

Tokens are one layer's hidden states (``layer``, see ``hf_trunk``).

References: Baevski et al. 2020, wav2vec 2.0, arXiv:2006.11477; Hsu et al. 2021, HuBERT,
arXiv:2106.07447; Radford et al. 2022, Whisper, arXiv:2212.04356.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import Tensor, nn

from polymodal.backbones.hf_common import import_transformers, load_pretrained, resolve_local_folder
from polymodal.encoders import ENCODERS
from polymodal.encoders.hf_trunk import TrunkLayout, encoder_apply_freeze, encoder_train, prepare_trunk
from polymodal.encoders.hf_trunk import read_preprocessor_config
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.errors import ConfigError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

WHERE = "model.encoders.audio"
# Feature extractors' variance floor in the per-clip normalisation (Wav2Vec2FeatureExtractor).
NORM_EPS = 1e-7
# Whisper's log-mel: power floor before log10, dynamic range kept below the clip's peak (in log10
# units, i.e. 80 dB), and the affine map to about [-1, 1] (Radford et al. 2022, audio.py).
WHISPER_LOG_FLOOR = 1e-10
WHISPER_RANGE = 8.0
WHISPER_OFFSET = 4.0
WHISPER_CONV_STRIDE = 2  # conv2 halves the mel frames
CTC_FAMILIES = ("wav2vec2", "hubert")


def _layout(config) -> TrunkLayout:
    if config.model_type == "whisper":
        return TrunkLayout(final_norm="layer_norm", fixed_params=("embed_positions.weight",))
    # Stable-layer-norm (large) models norm after the blocks; the base models norm before them.
    final_norm = "encoder.layer_norm" if getattr(config, "do_stable_layer_norm", False) else None
    # masked_spec_embed is the mask token of Hugging Face's own SpecAugment, switched off below.
    return TrunkLayout(final_norm=final_norm, unused_params=("masked_spec_embed",))


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """The two fields of a Hugging Face encoder output that are read here."""

    last_hidden_state: Tensor  # (B, N, D)
    hidden_states: list[Tensor] | None  # embeddings, then one (B, N, D) per block


def conv_output_lengths(lengths: Tensor, kernels: tuple[int, ...], strides: tuple[int, ...]) -> Tensor:
    """Frames after a stack of unpadded 1-D convs: L -> floor((L - k) / s) + 1 each, never below 0. (B,)."""
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=0)
    return lengths


@ENCODERS.register("hf_audio")
class HFAudioEncoder(nn.Module):
    """Waveforms (B, T) with mask (B, T) -> one layer's tokens (B, N, hidden size) of a pretrained model.

    Args:
        num_mels: the library's mel bins the assembler passes; unused (this encoder reads waveforms).
        path: local folder with the model and its ``preprocessor_config.json``. Nothing is downloaded.
        freeze: ``frozen``, ``last_n`` or ``full`` (see ``hf_trunk``).
        last_n: blocks that train under ``freeze=last_n``.
        layer: whose hidden states the tokens are: -1 the last layer (with the model's final norm),
            k or -k a block's raw output (``hidden_states[k]`` of the model).
        sample_rate: the waveforms' rate in Hz (``data.sample_rate``); must be the model's.
        batch_padding: run a group-norm wav2vec 2.0 / HuBERT model on the zero-padded batch, without
            a mask (Hugging Face's recipe: one call, but a clip's tokens shift with its batch's
            padding), instead of one clip at a time. Models with an attention mask ignore it.
    """

    modality = Modality.AUDIO
    input_kind = "waveform"

    def __init__(
        self,
        num_mels: int,
        *,
        path: str,
        freeze: str = "frozen",
        last_n: int = 1,
        layer: int = -1,
        sample_rate: int = 16000,
        batch_padding: bool = False,
    ) -> None:
        super().__init__()
        folder = resolve_local_folder(path, what=f"{WHERE}.path")
        extractor = read_preprocessor_config(folder, WHERE)
        transformers = import_transformers()
        model = load_pretrained(transformers.AutoModel, folder)
        if model.config.model_type == "whisper":
            model = model.get_encoder()  # the decoder is dropped with ``model``
        self.kind = model.config.model_type
        if self.kind not in (*CTC_FAMILIES, "whisper"):
            families = ", ".join((*CTC_FAMILIES, "whisper"))
            raise ConfigError(f"{WHERE}: {folder} holds a {self.kind!r} model; hf_audio reads {families}")
        model_rate = int(extractor.get("sampling_rate", 16000))
        if sample_rate != model_rate:
            raise ConfigError(
                f"{WHERE}.sample_rate={sample_rate} but the model in {folder} reads {model_rate} Hz audio; "
                f"set data.sample_rate={model_rate} (hf_audio does not resample)"
            )
        if self.kind in CTC_FAMILIES:
            model.config.apply_spec_augment = False  # see the module docstring
        self.model = model
        self.trunk = prepare_trunk(model, _layout(model.config), layer=layer, freeze=freeze, last_n=last_n, where=WHERE)
        self.library_num_mels = num_mels  # recorded for the reader; not used
        self.freeze, self.layer, self.sample_rate, self.path = freeze, layer, sample_rate, str(folder)
        self.dim_out = model.config.hidden_size
        self.normalize = bool(extractor.get("do_normalize", True))
        self.pass_mask = bool(extractor.get("return_attention_mask", False))
        self.batch_padding = batch_padding
        if self.kind == "whisper":
            self._init_whisper(transformers, folder)
        self.train(self.training)
        logger.info("loaded %s from %s (layer %d, %s)", type(model).__name__, folder, self.trunk.num_layers, freeze)

    def _init_whisper(self, transformers, folder) -> None:
        """The log-mel settings and filters of the folder's WhisperFeatureExtractor."""
        fe = transformers.WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
        self.n_fft, self.hop_length, self.window_samples = fe.n_fft, fe.hop_length, fe.n_samples
        expected = self.model.config.max_source_positions * WHISPER_CONV_STRIDE
        if fe.nb_max_frames != expected or fe.feature_size != self.model.config.num_mel_bins:
            raise ConfigError(
                f"{WHERE}: the feature extractor in {folder} makes {fe.nb_max_frames} frames of {fe.feature_size} "
                f"mels but the encoder reads {expected} of {self.model.config.num_mel_bins}"
            )
        # Non-persistent: they come from the folder's extractor, not from training.
        self.register_buffer("mel_filters", torch.tensor(fe.mel_filters, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    train = encoder_train  # frozen parts stay in eval mode
    apply_freeze = encoder_apply_freeze

    def cache_identity(self) -> str:
        """Everything that decides this encoder's output, for ``feature_cache`` keys."""
        return f"hf_audio|{self.path}|layer={self.layer}|rate={self.sample_rate}|batch_padding={self.batch_padding}"

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Tokens per clip of ``num_samples`` (B,) real samples. (B,) long."""
        if self.kind == "whisper":
            mel_frames = -torch.div(-num_samples, self.hop_length, rounding_mode="floor")  # ceil(T / hop)
            return -torch.div(-mel_frames, WHISPER_CONV_STRIDE, rounding_mode="floor")  # ceil(F / 2)
        config = self.model.config
        return conv_output_lengths(num_samples, tuple(config.conv_kernel), tuple(config.conv_stride))

    def normalize_waveforms(self, waveforms: Tensor, mask: Tensor) -> Tensor:
        """wav2vec 2.0 / HuBERT input: (B, T) -> zero mean, unit variance over each clip's real
        samples, padding 0. fp32: a variance over 10^5 samples in bf16 keeps about 3 digits."""
        x = waveforms.float() * mask
        count = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        mean = x.sum(1, keepdim=True) / count
        var = ((x - mean) * mask).square().sum(1, keepdim=True) / count
        return (x - mean) / torch.sqrt(var + NORM_EPS) * mask

    def whisper_log_mel(self, waveforms: Tensor, mask: Tensor) -> Tensor:
        """Whisper input: (B, T) -> (B, num_mel_bins, window frames), as WhisperFeatureExtractor.

        fp32 island: mel power spans ~10 decades and goes into a log.
        """
        x = (waveforms.float() * mask)[:, : self.window_samples]
        x = nn.functional.pad(x, (0, self.window_samples - x.shape[1]))  # the 30 s window
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(
                x, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="reflect", return_complex=True
            )  # (B, n_fft//2+1, frames + 1)
            power = spec[..., :-1].abs().square()  # (B, n_fft//2+1, frames): the last frame is dropped, as Whisper does
            mel = torch.einsum("kf,bkt->bft", self.mel_filters, power)  # (B, mels, frames)
            log_mel = torch.log10(mel.clamp(min=WHISPER_LOG_FLOOR))
            peak = log_mel.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1): per clip
            return (torch.maximum(log_mel, peak - WHISPER_RANGE) + WHISPER_OFFSET) / WHISPER_OFFSET

    def _run_per_clip(self, values: Tensor, lengths: Tensor, *, with_hidden: bool) -> ModelOutput:
        """A model without an attention mask (group-norm wav2vec 2.0 / HuBERT), one clip at a time at
        its own length: its group norm and attention would otherwise read the batch's padding, and
        an item's tokens would depend on the batch it lands in. (B, T) -> outputs padded to (B, N, D)."""
        token_lengths = self.output_lengths(lengths)
        num_tokens = int(token_lengths.max()) if token_lengths.numel() else 0
        empty = values.new_zeros(1, num_tokens, self.dim_out)  # a clip too short for one token (or absent)
        states: list[list[Tensor]] = []  # per clip: last hidden state, then the hidden states
        for b, n in enumerate(lengths.tolist()):
            if token_lengths[b] == 0:
                states.append([empty] * (1 + (self.trunk.num_layers + 1 if with_hidden else 0)))
                continue
            out = self.model(input_values=values[b : b + 1, :n], output_hidden_states=with_hidden, return_dict=True)
            states.append([out.last_hidden_state, *(out.hidden_states if with_hidden else ())])
        # Per output, each clip's (1, N_b, D) -> (B, num_tokens, D), zero padded at the end.
        pad = lambda h: nn.functional.pad(h, (0, 0, 0, num_tokens - h.shape[1]))  # noqa: E731
        stacked = [torch.cat([pad(clip[i]) for clip in states]) for i in range(len(states[0]))]
        return ModelOutput(stacked[0], stacked[1:] if with_hidden else None)

    def forward_intermediates(self, waveforms: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Extract the model's features, run it, keep every kept block's output.

        Args:
            waveforms: (B, T) float at ``sample_rate``, zero-padded.
            mask: (B, T) bool, True on real samples (padding at the end); None when all are real.

        Returns:
            EncoderIntermediates: ``output`` as ``forward``; ``hidden``: one (B, N, D) per kept
            block, first to last (Hugging Face's ``hidden_states[1:]``).
        """
        out, token_mask = self._run(waveforms, mask, with_hidden=True)
        n = token_mask.shape[1]
        hidden = [h[:, :n] for h in out.hidden_states[1:]]
        return EncoderIntermediates(EncoderOutput(out.last_hidden_state[:, :n], token_mask), hidden)

    def forward(self, waveforms: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """(B, T) waveforms and (B, T) mask -> tokens (B, N, hidden size) with mask (B, N) at the model's frame rate."""
        out, token_mask = self._run(waveforms, mask, with_hidden=False)
        return EncoderOutput(out.last_hidden_state[:, : token_mask.shape[1]], token_mask)

    def _run(self, waveforms: Tensor, mask: Tensor | None, *, with_hidden: bool):
        if waveforms.ndim != 2:
            raise ValueError(
                f"hf_audio reads waveforms (B, T), got {tuple(waveforms.shape)}; is a log-mel batch fed to it?"
            )
        if mask is None:
            mask = torch.ones(waveforms.shape, dtype=torch.bool, device=waveforms.device)
        lengths = mask.sum(1)  # (B,)
        if self.kind == "whisper":
            if waveforms.shape[1] > self.window_samples and bool((lengths > self.window_samples).any()):
                raise ValueError(
                    f"a clip of {int(lengths.max())} samples exceeds Whisper's {self.window_samples}-sample window; "
                    f"cut clips shorter (data.max_audio_seconds)"
                )
            flags = dict(output_hidden_states=with_hidden, return_dict=True)
            out = self.model(input_features=self.whisper_log_mel(waveforms, mask), **flags)
        else:
            values = self.normalize_waveforms(waveforms, mask) if self.normalize else waveforms.float() * mask
            flags = dict(output_hidden_states=with_hidden, return_dict=True)
            if self.pass_mask:
                out = self.model(input_values=values, attention_mask=mask.long(), **flags)
            elif self.batch_padding:
                out = self.model(input_values=values, **flags)
            else:
                out = self._run_per_clip(values, lengths, with_hidden=with_hidden)
        token_lengths = self.output_lengths(lengths)
        n = int(token_lengths.max()) if self.kind == "whisper" else out.last_hidden_state.shape[1]
        token_mask = torch.arange(n, device=waveforms.device)[None] < token_lengths[:, None]  # (B, N)
        return out, token_mask
