"""Zero-shot classification: prompt ids against the collator's, prompt ensembling against a
hand-computed mean, hand-checked nearest-class scoring, and a tiny CLIP model trained for a few
dozen steps on a toy task classifying above chance from class names alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymodal.config import DataConfig, load_config
from polymodal.data.batch import Sample
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets.spoken_numbers.numbers import number_to_words
from polymodal.datasets.spoken_numbers.source import class_prompts
from polymodal.evaluation.zero_shot import (
    class_embeddings,
    embed_dataset,
    embed_texts,
    encode_texts,
    zero_shot_accuracy,
    zero_shot_from_embeddings,
)
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.models.shapes import DataShapes, TextSpecials

CLASSES = (1, 2, 3, 4, 5)
TRAIN_TEMPLATES = ("{words}", "{digits}", "the number {words}", "the number {digits}")
HEIGHT, WIDTH = 32, 96
BAND = WIDTH // len(CLASSES)  # class k lights up its own vertical band of the image


def toy_sample(label: int, rng: np.random.Generator) -> Sample:
    image = 0.15 * rng.random((1, HEIGHT, WIDTH), dtype=np.float32)
    k = CLASSES.index(label)
    image[:, :, k * BAND : (k + 1) * BAND] += 0.8
    template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
    caption = template.format(words=number_to_words(label), digits=label)
    return Sample(image=torch.from_numpy(image.clip(0, 1)), text=caption, label=label)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    rng = np.random.default_rng(0)
    texts = [toy_sample(int(rng.choice(CLASSES)), rng).text for _ in range(200)]
    return TextTokenizer.train(texts, vocab_size=300)


def tiny_clip(tokenizer: TextTokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = load_config(
        ["clip"],
        [
            "model.dim=32", "model.backbone.num_layers=1", "model.backbone.num_heads=2",
            "model.encoders.image.num_stages=3", "model.contrastive.embed_dim=null", "model.contrastive.unique_labels=false",
        ],  # fmt: skip
    )
    del config.model.encoders["audio"]
    specials = TextSpecials(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    return build_model(config, DataShapes(image_size=(HEIGHT, WIDTH), num_mels=16, text=specials))


def test_prompt_ids_equal_the_collators(tokenizer):
    collator = build_collator(tokenizer, DataConfig(max_text_tokens=6))
    texts = ["the number forty two", "7", "a photo of the number one hundred and five"]
    batch = collator([Sample(text=t) for t in texts])
    ids, mask = encode_texts(texts, tokenizer, max_tokens=6)
    assert torch.equal(ids, batch.inputs[Modality.TEXT]) and torch.equal(mask, batch.masks[Modality.TEXT])
    assert ids[1, 0] == tokenizer.bos_id and ids[0, -1] == tokenizer.eos_id  # cut, still ends with <eos>


def test_class_vector_is_the_normalised_mean_of_its_prompts(tokenizer):
    model = tiny_clip(tokenizer).eval()
    templates = ("{words}", "the number {digits}", "a photo of the number {words}")
    assert class_prompts(42, templates) == ["forty two", "the number 42", "a photo of the number forty two"]
    got = class_embeddings(model, tokenizer, [3, 42], lambda label: class_prompts(label, templates))
    for row, label in enumerate([3, 42]):
        singles = torch.stack([embed_texts(model, [p], tokenizer)[0] for p in class_prompts(label, templates)])
        torch.testing.assert_close(got[row], F.normalize(singles.mean(0), dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_nearest_class_scoring_by_hand():
    class_emb = torch.eye(3)  # classes 10, 20, 30 on the axes
    items = F.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    labels = torch.tensor([10, 30, 10, 20])  # right, right, wrong (nearest 20), wrong (nearest 30)
    got = zero_shot_from_embeddings(items, labels, class_emb, [10, 20, 30], heldout_labels={20, 99})
    assert got == {"accuracy": 0.5, "count": 4, "num_classes": 3, "heldout_accuracy": 0.0, "heldout_count": 1}
    assert "heldout_accuracy" not in zero_shot_from_embeddings(items, labels, class_emb, [10, 20, 30])


def test_tiny_trained_model_classifies_above_chance(tokenizer):
    model = tiny_clip(tokenizer).train()
    collator = build_collator(tokenizer, DataConfig())
    rng = np.random.default_rng(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(80):
        labels = rng.permutation(CLASSES).tolist() * 2  # each class twice, in a fresh order
        batch = collator([toy_sample(label, rng) for label in labels])
        optimizer.zero_grad()
        sum(model(batch).losses.values()).backward()
        optimizer.step()
    test_rng = np.random.default_rng(2)
    test_set = [toy_sample(label, test_rng) for label in CLASSES * 8]
    prompts = lambda label: class_prompts(label, ("{words}", "the number {digits}"))  # noqa: E731
    got = zero_shot_accuracy(model, test_set, collator, tokenizer, Modality.IMAGE, prompts, heldout_labels={3})
    assert got["count"] == 40 and got["num_classes"] == len(CLASSES) and got["heldout_count"] == 8
    chance = 1 / len(CLASSES)
    assert got["accuracy"] >= 3.5 * chance, got
    # The same figure from precomputed embeddings, and limit/class_labels respected.
    emb, labels = embed_dataset(model, test_set, collator, [Modality.IMAGE])[Modality.IMAGE]
    class_emb = class_embeddings(model, tokenizer, list(CLASSES), prompts)
    assert zero_shot_from_embeddings(emb, labels, class_emb, CLASSES, heldout_labels={3}) == got
    few = zero_shot_accuracy(model, test_set, collator, tokenizer, Modality.IMAGE, prompts, class_labels=[1, 2], limit=7, batch_size=4)
    assert few["count"] == 7 and few["num_classes"] == 2
    # An untrained model (same architecture) sits near chance on the same items.
    untrained = zero_shot_accuracy(tiny_clip(tokenizer, seed=3), test_set, collator, tokenizer, Modality.IMAGE, prompts, heldout_labels={3})
    assert untrained["accuracy"] < got["accuracy"]


def test_unlabelled_items_get_labels_of_their_own(tokenizer):
    model = tiny_clip(tokenizer)
    collator = build_collator(tokenizer, DataConfig())
    rng = np.random.default_rng(3)
    items = [toy_sample(1, rng) for _ in range(3)]
    items = [Sample(image=s.image, text=s.text) for s in items]  # label -1
    embedded = embed_dataset(model, items, collator, [Modality.IMAGE, Modality.TEXT], batch_size=2)
    assert embedded[Modality.IMAGE][1].tolist() == embedded[Modality.TEXT][1].tolist() == [-2, -3, -4]


def test_clip_figures_agree_with_the_separate_evaluations(tokenizer):
    from polymodal.datasets.base import Splits, build_source
    from polymodal.datasets.spoken_numbers.source import PROMPT_TEMPLATES
    from polymodal.evaluation.retrieval import recall_at_k
    from polymodal.evaluation.zero_shot import clip_figures
    from polymodal.training.run import Run

    model = tiny_clip(tokenizer)
    config = load_config(["clip"])
    collator = build_collator(tokenizer, config.data)
    rng = np.random.default_rng(4)
    test_set = [toy_sample(label, rng) for label in CLASSES * 3]
    splits = Splits(train=[], val=[], test=test_set, train_texts=[], heldout_labels=frozenset({2}))
    source = build_source(config.data, config.seed)  # the built-in data's prompts, nothing read
    figures = clip_figures(Run(config, None, source, tokenizer, collator, model, splits), "test")  # type: ignore[arg-type]
    assert set(figures) == {"zero_shot_image", "retrieval_image_to_text", "retrieval_text_to_image"}
    main = lambda label: class_prompts(label, PROMPT_TEMPLATES[Modality.IMAGE])  # noqa: E731
    expected = zero_shot_accuracy(model, test_set, collator, tokenizer, Modality.IMAGE, main, heldout_labels={2})
    assert {k: figures["zero_shot_image"][k] for k in expected} == expected
    assert 0.0 <= figures["zero_shot_image"]["unseen_prompts_accuracy"] <= 1.0
    embedded = embed_dataset(model, test_set, collator, [Modality.IMAGE, Modality.TEXT])
    (img, img_y), (txt, txt_y) = embedded[Modality.IMAGE], embedded[Modality.TEXT]
    assert figures["retrieval_text_to_image"] == recall_at_k(txt, img, txt_y, img_y)
    assert PROMPT_TEMPLATES[Modality.IMAGE][0] == "{words}"
