"""Griffin-Lim: our batched ``GriffinLimVocoder.griffin_lim`` against librosa's ``griffinlim`` on the
same magnitudes, in one run.

Every evaluation of a text->audio run vocodes its generated speech (500 clips) and the reference
voice of the asked numbers (``judge_accuracy_on_reference_voice``); the vocoder was most of the main
job's evaluation time. Both sides run the same fast Griffin-Lim (momentum 0.99, 32 iterations, zero
start phase) on the STFT magnitudes of real built-in speech clips padded to one length, as the
evaluation batches them. librosa takes one clip at a time (it vectorises over a leading batch
dimension too, which is timed as well).

    python benchmarks/bench_vocoder.py --clips 250 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import librosa
import numpy as np
import torch

from polymodal.config import DataConfig
from polymodal.datasets.spoken_numbers.references import reference_speech
from polymodal.decoders.vocoder import GriffinLimVocoder

ITERATIONS = 32
MOMENTUM = 0.99


def magnitudes(clips: int, data: DataConfig) -> torch.Tensor:
    """(clips, K, F) STFT magnitudes of the reference voice saying the first ``clips`` numbers, padded to the longest."""
    spoken = reference_speech(range(clips), sample_rate=data.sample_rate)
    audio = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(r.value).float() for r in spoken.values()], batch_first=True)
    window = torch.hann_window(data.n_fft)
    return torch.stft(audio, data.n_fft, data.hop_length, window=window, center=True, pad_mode="reflect", return_complex=True).abs()


def timed(run, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = DataConfig()
    magnitude = magnitudes(args.clips, data)
    vocoder = GriffinLimVocoder(
        sample_rate=data.sample_rate, n_fft=data.n_fft, hop_length=data.hop_length, num_mels=data.num_mels,
        num_iters=ITERATIONS, momentum=MOMENTUM, random_phase=False,
    )  # fmt: skip
    settings = dict(n_iter=ITERATIONS, hop_length=data.hop_length, n_fft=data.n_fft, window="hann", center=True,
                    pad_mode="reflect", momentum=MOMENTUM, init=None)  # fmt: skip
    array = magnitude.numpy()
    ours = timed(lambda: vocoder.griffin_lim(magnitude), args.repeats)
    one_by_one = timed(lambda: [librosa.griffinlim(m, **settings) for m in array], args.repeats)
    batched = timed(lambda: librosa.griffinlim(array, **settings), args.repeats)
    ours_audio = vocoder.griffin_lim(magnitude).numpy()
    theirs_audio = librosa.griffinlim(array, **settings)
    error = np.linalg.norm(ours_audio - theirs_audio) / np.linalg.norm(theirs_audio)
    print(f"torch {torch.__version__}, librosa {librosa.__version__}, {args.threads} threads; "
          f"{args.clips} clips x {magnitude.shape[-1]} frames, {ITERATIONS} iterations, momentum {MOMENTUM}")  # fmt: skip
    print(f"polymodal, batched        {ours:7.2f} s")
    print(f"librosa, clip by clip     {one_by_one:7.2f} s  ({one_by_one / ours:.2f}x ours)")
    print(f"librosa, batched          {batched:7.2f} s  ({batched / ours:.2f}x ours)")
    print(f"waveforms differ by {error:.1e} of librosa's norm")


if __name__ == "__main__":
    main()
