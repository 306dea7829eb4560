"""Modality encoders: raw (preprocessed) input -> tokens (B, N, D_m).

Each encoder is registered with the modality it reads (``modality`` class attribute) and takes its
wiring positionally: image encoders ``(in_channels, image_size)``, text encoders ``(vocab_size,)``,
audio encoders ``(num_mels,)``. Settings are keyword-only. Every encoder has one interface,
``forward(inputs, mask=None) -> EncoderOutput`` and ``forward_intermediates(inputs, mask=None)``,
whatever its modality (an image encoder accepts the mask and ignores it: images have no padding).
Audio encoders read log-mel frames (B, F, num_mels) unless their class says
``input_kind = "waveform"`` (``hf_audio``): those read (B, T) waveforms at the dataset's rate.
"""

from polymodal.registry import Registry

ENCODERS: Registry = Registry("encoder")

from polymodal.encoders import audio_conv, cnn, text_embedding  # noqa: E402,F401  (register parts)
from polymodal.encoders import vit  # noqa: E402,F401  (registers "vit")
from polymodal.encoders import hf_text  # noqa: E402,F401  (registers "hf_text"; imports transformers lazily)
from polymodal.encoders import hf_audio, hf_image  # noqa: E402,F401  (register "hf_audio", "hf_image"; lazily too)
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput  # noqa: E402

__all__ = ["ENCODERS", "EncoderOutput", "EncoderIntermediates"]
