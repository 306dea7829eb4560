"""The cost of exact per-clip features for group-norm wav2vec 2.0 / HuBERT models.

Claim (in ``encoders/hf_audio.py``): running a group-norm speech model one clip at a time, so that
a clip's tokens do not depend on the batch's padding, costs 1.5-1.8x Hugging Face's batched
zero-padded call on CPU, although the batched call also computes the padding: B small calls use
the cores worse than one large one. The peer is transformers' ``Wav2Vec2Model`` on the zero-padded
batch without an attention mask (its documented recipe for these models; ``batch_padding=True``).
Base-model layout (7 convs, group norm) at reduced width and depth, random weights; clips of
1-2 s at 16 kHz.

    OMP_NUM_THREADS=2 python benchmarks/bench_hf_audio_per_clip.py
    python benchmarks/bench_hf_audio_per_clip.py --batch 16 --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

from polymodal.encoders.hf_audio import HFAudioEncoder

RATE = 16000


def _best(fns: list, repeats: int) -> list[float]:
    """Best time of each function, the functions interleaved so a busy machine slows all alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, conv_dim=(256,) * 7
    )
    model = transformers.Wav2Vec2Model(config).eval()
    lengths = torch.randint(RATE, 2 * RATE, (args.batch,))
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # (B, T)
    waveforms = 0.1 * torch.randn(mask.shape) * mask
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        transformers.Wav2Vec2FeatureExtractor().save_pretrained(folder)
        encoder = HFAudioEncoder(16, path=folder).eval()
    values = encoder.normalize_waveforms(waveforms, mask)
    with torch.no_grad():
        ours = encoder(waveforms, mask)
        first = model(input_values=values[:1, : int(lengths[0])]).last_hidden_state[0]
        assert torch.allclose(ours.tokens[0, : first.shape[0]], first, atol=1e-4)  # per clip = the model on the clip
        per_clip, batched = _best([lambda: encoder(waveforms, mask), lambda: model(input_values=values)], args.repeats)
    print(f"batch {args.batch}, clips {int(lengths.min())}-{int(lengths.max())} samples, {torch.get_num_threads()} threads")
    print(f"{'path':<40} {'ms / batch':>11} {'vs batched':>11}")
    print(f"{'transformers, batched, zero padding':<40} {batched * 1e3:>11.1f} {1.0:>10.2f}x")
    print(f"{'hf_audio, one clip at a time (exact)':<40} {per_clip * 1e3:>11.1f} {per_clip / batched:>10.2f}x")


if __name__ == "__main__":
    main()
