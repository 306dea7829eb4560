"""Collation: a list of ``Sample`` (or None for samples that failed to load) -> one ``Batch``.

Images are stacked and normalised; captions become ``[bos] ids [eos]`` padded with ``pad``;
waveforms lose their leading and trailing silence (``data.trim_db``, off by default), are
zero-padded and turned into log-mel frames (floored at ``data.top_db`` below each clip's peak when
set) with a frame mask, or, for an audio
encoder that reads waveforms (its class says ``input_kind = "waveform"``), kept as (B, T) samples
with a sample mask. A modality that only some items carry is filled with zeros/pad for the others
and marked absent in ``present``. Given a dataset's aligned references (``references.py``), a batch
also carries each labelled item's reference targets, for heads that learn from them; each
reference's targets are worked out once and kept, since references never change.

Training items carry their key (``Sample.key``): the batch then holds their indices, and
VTLP (``data.augment.audio.vtlp_p``) warps their filterbank and SpecAugment (``spec_augment_p``)
masks their log-mel frames, drawn from each item's key alone so that they replay on resume. Items
without a key (evaluation) are never warped nor masked.

When nothing changes a training item's waveform from epoch to epoch (no waveform augmentation and
no VTLP: ``cache_log_mel``), its log-mel frames are worked out once, by key index, and kept: the
main job draws each clip about three times, and its step is about 15 ms (5%) shorter once the
frames are kept (BENCHMARKS.md, "Log-mel frames kept per training clip"). Each clip's frames are
then computed on their own, as the clip followed by zeros (the references' rule), so that they
never depend on which clips share a batch and a resumed run reads the same values as one that
never stopped. SpecAugment masks the kept frames afresh in every batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from polymodal.config import DataConfig
from polymodal.data.audio import LogMel, load_audio, speech_bounds
from polymodal.data.augment import AudioAugmentSettings, sample_rng, spec_augment
from polymodal.data.augment_vtlp import draw_warp, vtlp_filterbanks
from polymodal.data.batch import AlignedTargets, Batch, ItemKey, Sample
from polymodal.data.image import load_image, normalize_images
from polymodal.data.references import Reference, token_durations
from polymodal.data.speaker_norm import SpeakerStatistics, speaker_normalised
from polymodal.data.text import TextTokenizer
from polymodal.errors import DataError
from polymodal.modality import Modality

NUM_TEXT_SPECIALS = 2  # bos + eos around every caption
# What a generator reads for a text: (target modality, text) -> text (a dataset's front end).
FrontEnd = Callable[[Modality, str], str]
AUDIO_INPUTS = ("log_mel", "waveform")  # what the audio encoder reads


def as_written(target: Modality, text: str) -> str:
    """The front end of data that knows no better: the text itself."""
    return text


class Collator:
    """Turns samples into a ``Batch``. Also counts the None samples it dropped (``num_skipped``).

    With ``DataLoader(num_workers > 0)`` each worker holds its own copy, so ``num_skipped`` here
    counts only batches collated in this process.
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        num_mels: int,
        max_text_tokens: int,
        max_audio_seconds: float,
        references: dict[Modality, dict[int, Reference]] | None = None,
        front_end: FrontEnd = as_written,
        audio_input: str = "log_mel",
        spec_augment: AudioAugmentSettings | None = None,
        seed: int = 0,
        top_db: float | None = None,
        trim_db: float | None = None,
        cache_log_mel: bool = False,
        speaker_norm: bool = False,
    ) -> None:
        if max_text_tokens < NUM_TEXT_SPECIALS:
            raise ValueError(f"max_text_tokens={max_text_tokens} leaves no room for <bos> and <eos>; use >= 2")
        if audio_input not in AUDIO_INPUTS:
            raise ValueError(f"audio_input={audio_input!r}; valid: {', '.join(AUDIO_INPUTS)}")
        self.audio_input = audio_input
        self.spec_augment = spec_augment if spec_augment is not None and spec_augment.spec_augment_p > 0 else None
        self.vtlp = spec_augment if spec_augment is not None and spec_augment.vtlp_p > 0 else None
        self.seed = seed
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.max_audio_samples = int(round(max_audio_seconds * sample_rate))
        self.log_mel = LogMel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, num_mels=num_mels, top_db=top_db)
        self.trim_db = trim_db
        self.references = dict(references or {})  # target modality -> label -> its reference
        self.front_end = front_end
        # Per target modality and label, the (L,) durations of [bos] tokens [eos]: fixed by the
        # reference, so worked out once here rather than in every batch.
        self.durations = {
            modality: {label: self._durations(modality, ref) for label, ref in table.items()}
            for modality, table in self.references.items()
        }
        self._reference_rows: dict[tuple[Modality, int], tuple[Tensor, Tensor, Tensor]] = {}
        # Training item index -> its (F, num_mels) log-mel frames, with cache_log_mel (never with VTLP).
        self.cache_log_mel = cache_log_mel and self.vtlp is None
        self._log_mels: dict[int, Tensor] = {}
        # Speaker -> (mean log-mel (num_mels,), 1 / std), from fit_speakers, with speaker_norm.
        self.speaker_norm = speaker_norm
        self.speakers: dict[str, tuple[Tensor, Tensor]] = {}
        self.num_skipped = 0

    def __call__(self, samples: Sequence[Sample | None]) -> Batch:
        """Collate. A batch whose samples all failed comes back with size 0 (skip it)."""
        kept = [s for s in samples if s is not None]
        self.num_skipped += len(samples) - len(kept)
        inputs: dict[Modality, Tensor] = {}
        masks: dict[Modality, Tensor] = {}
        present: dict[Modality, Tensor] = {}
        labels = torch.tensor([s.label for s in kept], dtype=torch.long)  # (B,)
        if not kept:
            return Batch(inputs, masks, present, labels)

        images = [s.image for s in kept]
        if any(x is not None for x in images):
            present[Modality.IMAGE] = torch.tensor([x is not None for x in images])
            inputs[Modality.IMAGE] = self._images(images)

        texts = [s.text for s in kept]
        if any(t is not None for t in texts):
            present[Modality.TEXT] = torch.tensor([t is not None for t in texts])
            inputs[Modality.TEXT], masks[Modality.TEXT] = self._texts(texts)

        clips = [s.audio if s.audio is None or self.trim_db is None else self._trim(s.audio) for s in kept]
        if any(a is not None for a in clips):
            present[Modality.AUDIO] = torch.tensor([a is not None for a in clips])
            if self.audio_input == "waveform":
                inputs[Modality.AUDIO], masks[Modality.AUDIO] = self._waveforms(clips)
            else:
                inputs[Modality.AUDIO], masks[Modality.AUDIO] = self._audio(clips, [s.key for s in kept], [s.speaker for s in kept])

        keyed = all(s.key is not None for s in kept)
        indices = torch.tensor([s.key.index for s in kept], dtype=torch.long) if keyed else None  # (B,)
        return Batch(inputs, masks, present, labels, self._aligned(labels.tolist()), indices)

    @staticmethod
    def _images(images: list[Tensor | None]) -> Tensor:
        """(C, H, W) in [0, 1] or None each -> (B, C, H, W) normalised, zeros where absent."""
        shapes = {tuple(x.shape) for x in images if x is not None}
        if len(shapes) > 1:
            raise DataError(f"images in one batch differ in shape {sorted(shapes)}; load them at one height/width")
        (shape,) = shapes
        out = torch.zeros((len(images), *shape), dtype=torch.float32)  # (B, C, H, W)
        for i, x in enumerate(images):
            if x is not None:
                out[i] = normalize_images(x.to(torch.float32))
        return out

    def _texts(self, texts: list[str | None]) -> tuple[Tensor, Tensor]:
        """Captions or None -> ids (B, L) padded with pad, mask (B, L) True on real tokens."""
        real = [i for i, t in enumerate(texts) if t is not None]
        encoded = self.tokenizer.encode_batch([texts[i] for i in real])
        keep = self.max_text_tokens - NUM_TEXT_SPECIALS
        rows: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(real, encoded):
            # Truncation keeps <eos> last, so the model still learns where a caption stops.
            rows[i] = [self.tokenizer.bos_id, *ids[:keep], self.tokenizer.eos_id]
        length = max(len(r) for r in rows)
        ids = torch.full((len(texts), length), self.tokenizer.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(texts), length), dtype=torch.bool)  # (B, L)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def _trim(self, clip: Tensor) -> Tensor:
        """(T,) -> (T',): the clip without its leading and trailing silence (``speech_bounds``, frames
        as the log-mel's). References are never trimmed: their durations count from their start."""
        start, end = speech_bounds(clip, top_db=self.trim_db, frame_length=self.log_mel.n_fft, hop_length=self.log_mel.hop_length)
        return clip[start:end]

    def _padded(self, clips: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        """(T,) waveforms or None -> (B, T) float32 cut to ``max_audio_seconds``, zero-padded; and
        the (B,) lengths after the cut (0 for None)."""
        cut = [None if a is None else a[: self.max_audio_samples] for a in clips]
        lengths = torch.tensor([0 if a is None else a.shape[0] for a in cut], dtype=torch.long)  # (B,)
        waveforms = torch.zeros((len(cut), int(lengths.max())), dtype=torch.float32)  # (B, T)
        for i, a in enumerate(cut):
            if a is not None:
                waveforms[i, : a.shape[0]] = a.to(torch.float32)
        return waveforms, lengths

    def _waveforms(self, clips: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        """(T,) waveforms or None -> (B, T) cut to ``max_audio_seconds``, zero-padded; mask (B, T)."""
        waveforms, lengths = self._padded(clips)
        return waveforms, torch.arange(waveforms.shape[1])[None, :] < lengths[:, None]

    def _audio(
        self, clips: list[Tensor | None], keys: list[ItemKey | None] | None = None, speakers: list[str | None] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(T,) waveforms or None -> log-mel (B, F, num_mels), zeros on padded frames; mask (B, F).
        With VTLP or SpecAugment on and every item keyed (training), each item's filterbank is warped
        and its frames masked as its key draws. With ``speaker_norm``, each item's frames are
        normalised by its speaker's statistics (``fit_speakers``), or by its own, before masking."""
        keyed = bool(keys) and all(k is not None for k in keys)
        if self.cache_log_mel and keyed:
            features, mask = self._kept_log_mels(clips, keys)
        else:
            waveforms, lengths = self._padded(clips)
            features = self.log_mel(waveforms, self._warped_filters(keys) if self.vtlp is not None and keyed else None)
            frames = torch.arange(features.shape[1])  # (F,)
            valid = self.log_mel.frame_lengths(lengths)  # (B,)
            mask = (frames[None, :] < valid[:, None]) & (lengths > 0)[:, None]  # (B, F)
        if self.speaker_norm:
            features = speaker_normalised(features, mask, speakers or [None] * len(clips), self.speakers)
        if self.spec_augment is not None and keyed:
            rngs = [sample_rng(self.seed, k.epoch, k.index, stream="spec_augment") for k in keys]
            features = spec_augment(features, mask, self.spec_augment, rngs)
        features = features.masked_fill(~mask[:, :, None], 0.0)  # padding reads as 0, as Batch documents
        return features, mask

    def fit_speakers(self, datasets: Sequence[Dataset]) -> None:
        """With ``speaker_norm``: take each speaker's log-mel statistics over his clips in
        ``datasets`` (each read once, unaugmented, trimmed as in a batch), for the batches to come.
        A speaker seen before is measured afresh over these datasets. Without it, nothing."""
        if not self.speaker_norm:
            return
        statistics = SpeakerStatistics()
        for dataset in {id(d): d for d in datasets}.values():  # a split given twice (val as test) counts once
            for index in range(len(dataset)):
                sample = dataset[index]
                if sample is None or sample.speaker is None or sample.audio is None:
                    continue
                clip = sample.audio if self.trim_db is None else self._trim(sample.audio)
                statistics.add(sample.speaker, self._clip_log_mel(clip))
        self.speakers.update(statistics.table())

    def _kept_log_mels(self, clips: list[Tensor | None], keys: list[ItemKey]) -> tuple[Tensor, Tensor]:
        """The training items' log-mel frames from the cache (computed on a miss): (B, F, num_mels)
        zero-padded, as the batched path pads them, and the (B, F) mask."""
        rows = []
        for clip, key in zip(clips, keys):
            if clip is None:
                rows.append(torch.zeros(0, self.log_mel.num_mels))
                continue
            if key.index not in self._log_mels:
                self._log_mels[key.index] = self._clip_log_mel(clip)
            rows.append(self._log_mels[key.index])
        counts = torch.tensor([row.shape[0] for row in rows])  # (B,)
        features = pad_sequence(rows, batch_first=True)  # (B, F, num_mels)
        return features, torch.arange(features.shape[1])[None, :] < counts[:, None]

    def _clip_log_mel(self, clip: Tensor) -> Tensor:
        """(T,) -> (F, num_mels): one clip's frames, cut to ``max_audio_seconds`` and followed by
        zeros, as in a batch where a longer clip pads it; F = ``frame_lengths`` of its length."""
        padded, length = self._padded([clip])  # (1, T), (1,)
        if int(length) == 0:
            return torch.zeros(0, self.log_mel.num_mels)
        padded = torch.nn.functional.pad(padded, (0, self.log_mel.n_fft // 2))  # (1, T + n_fft/2)
        return self.log_mel(padded)[0, : int(self.log_mel.frame_lengths(length))]

    def _warped_filters(self, keys: list[ItemKey]) -> Tensor:
        """(B, n_fft // 2 + 1, num_mels): each item's VTLP filterbank, its factor drawn from its key."""
        settings, log_mel = self.vtlp, self.log_mel
        low, high = settings.vtlp_range
        alphas = [draw_warp(sample_rng(self.seed, k.epoch, k.index, stream="vtlp"), p=settings.vtlp_p, low=low, high=high) for k in keys]
        return vtlp_filterbanks(
            alphas, num_mels=log_mel.num_mels, n_fft=log_mel.n_fft, sample_rate=log_mel.sample_rate,
            boundary_hz=settings.vtlp_boundary_hz,
        )  # fmt: skip

    def log_mel_view(self) -> "Collator":
        """This collator, but making log-mel frames whatever its audio encoder reads (for judges and
        statistics that read log-mel)."""
        if self.audio_input == "log_mel":
            return self
        view = copy.copy(self)
        view.audio_input = "log_mel"
        return view

    def _aligned(self, labels: list[int]) -> dict[Modality, AlignedTargets]:
        """Each labelled item's references as aligned targets, per modality that has any."""
        out = {}
        for modality, table in self.references.items():
            rows = [self._reference_row(modality, label) if label in table else None for label in labels]
            if all(row is None for row in rows):
                continue
            out[modality] = self._stack_rows(modality, rows)
        return out

    def _reference_row(self, modality: Modality, label: int) -> tuple[Tensor, Tensor, Tensor]:
        """A reference's ids (L,), durations (L,) and value: log-mel frames (F, num_mels) or the
        normalised image (1, H, W); worked out once per label, since references never change.

        A reference clip's frames are those of the clip followed by zeros, as in a batch where a
        longer clip pads it, so they do not depend on which other references share a batch."""
        key = (modality, label)
        if key not in self._reference_rows:
            ref = self.references[modality][label]
            ids = self._texts([ref.text])[0][0]  # (L,)
            if modality is Modality.AUDIO:
                value = self._clip_log_mel(torch.from_numpy(ref.value))  # (F, num_mels)
            else:
                value = normalize_images(torch.from_numpy(ref.value)[None].float() / 255.0)  # (1, H, W)
            self._reference_rows[key] = (ids, self.durations[modality][label], value)
        return self._reference_rows[key]

    def _stack_rows(self, modality: Modality, rows: list[tuple[Tensor, Tensor, Tensor] | None]) -> AlignedTargets:
        """Reference rows (None: the item has none, read as an empty row) padded into one
        ``AlignedTargets``."""
        present = torch.tensor([row is not None for row in rows])  # (B,)
        shape = next(row for row in rows if row is not None)[2].shape
        audio = modality is Modality.AUDIO
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, *shape[1:]) if audio else torch.zeros(shape))
        ids, durations, values = zip(*(empty if row is None else row for row in rows))
        lengths = torch.tensor([row.shape[0] for row in ids])  # (B,)
        mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]  # (B, L)
        ids = pad_sequence(ids, batch_first=True, padding_value=self.tokenizer.pad_id)  # (B, L)
        durations = pad_sequence(durations, batch_first=True)  # (B, L)
        if not audio:
            return AlignedTargets(ids, mask, durations, torch.stack(values), torch.ones((len(rows), shape[-1]), dtype=torch.bool), present)
        frames = torch.tensor([value.shape[0] for value in values])  # (B,)
        padded = pad_sequence(values, batch_first=True)  # (B, F, M)
        if padded.shape[1] == 0:  # every clip empty: one masked frame, as a collated batch has
            padded = padded.new_zeros(len(rows), 1, shape[1])
        value_mask = torch.arange(padded.shape[1])[None, :] < frames[:, None]  # (B, F)
        return AlignedTargets(ids, mask, durations, padded, value_mask, present)

    def _durations(self, modality: Modality, ref: Reference) -> Tensor:
        """(L,) float32 durations of ``ref``'s ``[bos] tokens [eos]``, its text truncated as
        ``_texts`` truncates it: log-mel frames (audio, the clip cut as ``_audio`` cuts it) or
        pixel columns (image)."""
        scale = 1.0
        if modality is Modality.AUDIO:
            scale = self.log_mel.hop_length
            if ref.length > self.max_audio_samples:
                ref = _cut(ref, self.max_audio_samples)
        _, offsets = self.tokenizer.encode_with_offsets(ref.text)
        lead, frames, trail = token_durations(ref, offsets[: self.max_text_tokens - NUM_TEXT_SPECIALS], scale)
        return torch.tensor([lead, *frames, trail], dtype=torch.float32)

    def source_texts(self, target: Modality, texts: list[str | None]) -> tuple[Tensor, Tensor]:
        """What a generator of ``target`` reads for each text, as the dataset's front end says
        (the built-in data: the words a speaker says, the digits a writer writes); ids (B, L) and
        mask (B, L)."""
        return self._texts([None if text is None else self.front_end(target, text) for text in texts])


def _cut(reference: Reference, length: int) -> Reference:
    """``reference`` with its extent cut to ``length`` (units past it become empty)."""
    return Reference(reference.text, reference.value, reference.units, reference.bounds.clip(max=length), length)


def build_collator(
    tokenizer: TextTokenizer,
    data_config: DataConfig,
    *,
    references: dict[Modality, dict[int, Reference]] | None = None,
    front_end: FrontEnd = as_written,
    audio_input: str = "log_mel",
    seed: int = 0,
) -> Collator:
    """A ``Collator`` with the settings of ``data_config`` (SpecAugment from its ``augment``), a
    dataset's ``references`` per target modality, its ``front_end``, what the audio encoder reads
    (``audio_input``: log_mel | waveform) and the run's ``seed`` (SpecAugment's draws). Training
    items' log-mel frames are kept unless waveform augmentation or VTLP changes them each epoch."""
    return Collator(
        tokenizer,
        sample_rate=data_config.sample_rate,
        n_fft=data_config.n_fft,
        hop_length=data_config.hop_length,
        num_mels=data_config.num_mels,
        max_text_tokens=data_config.max_text_tokens,
        max_audio_seconds=data_config.max_audio_seconds,
        references=references,
        front_end=front_end,
        audio_input=audio_input,
        spec_augment=data_config.augment.audio,
        seed=seed,
        top_db=data_config.top_db,
        trim_db=data_config.trim_db,
        cache_log_mel=not data_config.augment.audio.active,
        speaker_norm=data_config.speaker_norm,
    )


def collate_query(collator: Collator, data_config: DataConfig, modality: Modality, query: str) -> Batch:
    """A batch of one: a text, or the image or audio file at path ``query``, read at the data's
    size and rate and collated exactly as training data was."""
    if modality is Modality.TEXT:
        sample = Sample(text=query)
    elif modality is Modality.IMAGE:
        sample = Sample(
            image=load_image(query, height=data_config.image_height, width=data_config.image_width, channels=data_config.image_channels)
        )
    else:
        sample = Sample(audio=load_audio(query, sample_rate=data_config.sample_rate))
    return collator([sample])
