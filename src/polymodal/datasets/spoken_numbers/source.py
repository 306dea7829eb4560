"""The built-in dataset as a plug-in: spoken handwritten numbers (``build.py``), and all it knows:
numbers in words and numerals (``numbers.py``), what a writer writes or a speaker says for a text,
its reference handwriting and voice (``references.py``), prompts that name a number, and judges
that read generated images and speech (``judges.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from polymodal.config import DataConfig
from polymodal.data.references import Reference
from polymodal.datasets import DATASETS
from polymodal.datasets.base import Splits
from polymodal.datasets.spoken_numbers.numbers import number_to_words, parse_number, spoken_words, written_digits
from polymodal.modality import Modality

# Building, references, judges and the preview are imported where used: a run loaded for
# generation needs none of them (nor the seconds their imports take).

# The built-in speech's real frames have median -8.1 and interquartile range 6.5 (natural log of
# power), measured once; mel heads regress (x - center) / scale, which starts near their zero output.
LOG_MEL_CENTER = -8.0
LOG_MEL_SCALE = 6.0
# {words}: "forty two", {digits}: "42": each class in words and in numerals, in phrasings of the
# training captions (numbers.CAPTION_TEMPLATES). Phrasings training never shows ("a photo of the
# number {}", "{} spoken aloud") are the "unseen_prompts" set: the small byte-level BPE spells their
# new words byte by byte, and measured on a 1000-step run they scored 0.3-0.5% alone and halved the
# ensemble's accuracy (20% -> 9% from images), so they are scored apart.
PROMPT_TEMPLATES: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: ("{words}", "{digits}", "the number {words}", "the number {digits}", "a picture of {words}", "a handwritten {digits}"),
    Modality.AUDIO: ("{words}", "{digits}", "the number {words}", "the number {digits}"),
}
UNSEEN_TEMPLATES: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: ("a photo of the number {words}", "a photo of the number {digits}"),
    Modality.AUDIO: ("{words} spoken aloud", "{digits} spoken aloud"),
}


def class_prompts(label: int, templates: Iterable[str]) -> list[str]:
    """``42`` -> ``["forty two", "42", "the number forty two", ...]``."""
    return [t.format(words=number_to_words(label), digits=str(label)) for t in templates]


@DATASETS.register("spoken_numbers")
class SpokenNumbersSource:
    """Numbers of 1..``max_digits`` digits, each an image of real MNIST digits, a caption and
    espeak-ng speech; built once per setting and cached under ``$POLYMODAL_CACHE``.

    Args:
        data: the data config (image size, sample rate).
        seed: every random choice of the build.
        num_samples: samples over all splits (80% train, 10% val, 10% test).
        max_digits: numbers have 1..max_digits digits (at most 6).
        recorded_share: the share of the training speech "recorded" at build time (talker, room,
            noise, channel, microphone: ``recording.py``); validation and test speech stay clean.
        flite_share: the share of the training speech spoken by flite voices rather than espeak-ng
            ones (``flite.py``; needs the system's flite: ``apt-get install flite``).
    """

    references_for: ClassVar[frozenset[Modality]] = frozenset({Modality.IMAGE, Modality.AUDIO})
    label_parser = staticmethod(parse_number)

    def __init__(
        self,
        data: DataConfig,
        seed: int,
        *,
        num_samples: int = 20000,
        max_digits: int = 3,
        recorded_share: float = 0.0,
        flite_share: float = 0.0,
    ) -> None:
        if num_samples < 1 or not 1 <= max_digits <= 6:
            raise ValueError(f"need num_samples >= 1 and max_digits in 1..6, got {num_samples} and {max_digits}")
        if not 0.0 <= recorded_share <= 1.0:
            raise ValueError(f"recorded_share must lie in [0, 1], got {recorded_share}")
        if not 0.0 <= flite_share <= 1.0:
            raise ValueError(f"flite_share must lie in [0, 1], got {flite_share}")
        self.data, self.seed = data, seed
        self.num_samples, self.max_digits, self.recorded_share, self.flite_share = num_samples, max_digits, recorded_share, flite_share
        self._built = None

    @property
    def built(self):
        """The built data (``build.SpokenNumbers``), made or read from the cache on first use."""
        from polymodal.datasets.spoken_numbers.build import build_spoken_numbers

        if self._built is None:
            data = self.data
            self._built = build_spoken_numbers(
                num_samples=self.num_samples, seed=self.seed, max_digits=self.max_digits,
                image_height=data.image_height, image_width=data.image_width, sample_rate=data.sample_rate,
                recorded_share=self.recorded_share, flite_share=self.flite_share,
            )  # fmt: skip
        return self._built

    def load(self) -> Splits:
        built = self.built
        train = built.split_indices("train")
        return Splits(
            train=built.split("train"),
            val=built.split("val"),
            test=built.split("test"),
            train_texts=[built.captions[i] for i in train],
            heldout_labels=frozenset(int(n) for n in built.heldout_numbers),
            train_labels=frozenset(int(built.labels[i]) for i in train),
        )

    def source_text(self, target: Modality, text: str) -> str:
        """The words a speaker says (audio) or the digits a writer writes (image) for ``text``."""
        if target is Modality.AUDIO:
            return spoken_words(text)
        if target is Modality.IMAGE:
            return written_digits(text)
        return text.strip()

    def references(self, splits: Splits, targets: Iterable[Modality]) -> dict[Modality, dict[int, Reference]]:
        from polymodal.datasets.spoken_numbers.references import reference_speech

        out = {}
        for target in targets:
            if target is Modality.AUDIO:
                out[target] = reference_speech(splits.train_labels, sample_rate=self.data.sample_rate)
            elif target is Modality.IMAGE:
                out[target] = self.reference_images(splits.train_labels)
        return out

    def reference_images(self, numbers: Iterable[int]) -> dict[int, Reference]:
        from polymodal.datasets.spoken_numbers.references import reference_glyphs, reference_images

        data = self.data
        return reference_images(numbers, reference_glyphs(self.built), height=data.image_height, width=data.image_width)

    def log_mel_statistics(self, splits: Splits, collator: Any) -> tuple[float, float]:
        return LOG_MEL_CENTER, LOG_MEL_SCALE

    def prompt_sets(self, modality: Modality) -> dict[str, Callable[[int], list[str]]]:
        main = PROMPT_TEMPLATES.get(modality, PROMPT_TEMPLATES[Modality.IMAGE])
        unseen = UNSEEN_TEMPLATES.get(modality, UNSEEN_TEMPLATES[Modality.IMAGE])
        return {"": lambda label: class_prompts(label, main), "unseen_prompts": lambda label: class_prompts(label, unseen)}

    def evaluate_generation(self, run: Any, dataset: Dataset, generated: dict[str, Any], *, limit: int | None = None) -> dict[str, dict]:
        """The judges' reading of generated images and speech, each with its ceilings; for images
        also the Fréchet distance in the image judge's feature space (against the reference
        renderer's) and the variety of samples of one caption (``generation_figures.py``)."""
        from polymodal.datasets.spoken_numbers import judges
        from polymodal.datasets.spoken_numbers.generation_figures import image_generation_figures
        from polymodal.datasets.spoken_numbers.probe_training import predict_numbers
        from polymodal.datasets.spoken_numbers.references import reference_speech
        from polymodal.evaluation.samples import vocoder_for

        splits, device = run.splits, next(run.model.parameters()).device
        collator = run.collator.log_mel_view()  # the judges read log-mel, whatever the model reads
        found = self.load_judges(splits, collator)
        results: dict[str, dict] = {}
        for task, samples in generated.items():
            if samples.images is not None:
                read = judges.read_images(found.image, samples.images)
                figures = {**judges.score(read, samples.labels, splits.heldout_labels), "judge_accuracy_on_real_test": found.image_accuracy}
                tokenizer = run.model.image_tokenizer
                if tokenizer is not None:  # the judge on real images and on reference drawings after the VQ round trip
                    real = judges.reconstructed_probe_accuracy(tokenizer, found.image, dataset, collator, device=device, limit=limit)
                    asked = self.reference_images(set(samples.labels.tolist()))  # the numbers just asked for
                    figures["judge_accuracy_on_reference_round_trip"] = judges.reference_round_trip_accuracy(tokenizer, found.image, asked, device=device)
                    results["image_tokenizer"] = {"probe_correct_reconstructed": real}
                asked = set(samples.labels.tolist())
                figures.update(image_generation_figures(found.image, samples, self.reference_images(asked)))
                results[task] = figures
            elif samples.heard is not None:
                read = predict_numbers(found.audio, samples.heard, samples.heard_mask).cpu()
                figures = {**judges.score(read, samples.labels, splits.heldout_labels), "judge_accuracy_on_real_test": found.audio_accuracy}
                # The judge on the reference voice of the numbers just asked for, through the vocoder.
                asked = reference_speech(set(samples.labels.tolist()), sample_rate=self.data.sample_rate)
                figures["judge_accuracy_on_reference_voice"] = judges.reference_voice_accuracy(found.audio, asked, collator, vocoder_for(run.config.data))
                results[task] = figures
        return results

    def load_judges(self, splits: Splits, collator: Any) -> Any:
        """The image and audio judges of this data (``judges.Judges``), cached once trained;
        ``collator`` must make log-mel (``Collator.log_mel_view``), which the judges read."""
        from polymodal.datasets.spoken_numbers import judges

        return judges.load_judges(
            self.data, self.seed, splits.train, splits.test, collator, max_digits=self.max_digits,
            recorded_share=self.recorded_share, flite_share=self.flite_share,
        )  # fmt: skip

    def describe(self, splits: Splits) -> str:
        from polymodal.datasets.spoken_numbers.preview import format_stats

        return format_stats(self.built)

    def write_preview(self, splits: Splits, out: Path) -> list[Path]:
        from polymodal.datasets.spoken_numbers.preview import write_preview

        return write_preview(self.built, out)
