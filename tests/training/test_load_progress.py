"""A run loaded for use computes what its model computed in training: the progress-driven state of
its parts (a decoupler's opening gate, which is not a weight) is put back at the checkpoint's step.
Before, ``load_run`` left the gate closed, so a typed-slot model's shared slots read nothing and
``polymodal eval`` or ``embed`` gave every item the same embedding."""

from __future__ import annotations

import pytest
import torch

from polymodal.config import dump_config, load_config
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.training.checkpoint import save_checkpoint
from polymodal.training.run import TOKENIZER_FILE, data_shapes, load_run
from polymodal.training.schedules import set_model_progress, training_progress

STEPS = 10
TEXTS = ["forty two", "the number 7", "a handwritten 105", "three", "nine hundred"]


@pytest.mark.parametrize("decoupler", ["typed_slots", "query_bank"])
@pytest.mark.parametrize("step", [5, STEPS])  # the gate a third open (0.3 -> 0.6), and fully open
def test_a_loaded_run_embeds_as_the_trained_model_did(tmp_path, decoupler, step):
    config = load_config(["tiny"], [f"run_dir={tmp_path}", f"model.decoupler={{name: {decoupler}}}", f"train.steps={STEPS}"])
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    tokenizer.save(tmp_path / TOKENIZER_FILE)
    dump_config(config, tmp_path / "config.yaml")
    collator = build_collator(tokenizer, config.data)
    torch.manual_seed(0)
    trained = build_model(config, data_shapes(config, tokenizer, collator)).eval()
    set_model_progress(trained, training_progress(step - 1, STEPS))  # as the loop left it after `step` steps
    save_checkpoint(tmp_path, step=step, model=trained, optimizer=None, scheduler=None, extra_state={})

    run = load_run(tmp_path)
    loaded = run.model.eval()
    gate = loaded.contrastive.decoupler.gate.value
    assert gate == trained.contrastive.decoupler.gate.value and gate > 0
    ids, mask = collator.source_texts(Modality.IMAGE, TEXTS)
    with torch.no_grad():
        expected = trained.embed(Modality.TEXT, ids, mask)
        torch.testing.assert_close(loaded.embed(Modality.TEXT, ids, mask), expected, rtol=0, atol=0)
    assert expected.std(dim=0).sum() > 0  # items differ: the shared branch reads them


def test_the_best_checkpoint_brings_its_own_step(tmp_path):
    """Weights only (``checkpoints/best/``): the step comes from the weights file."""
    from polymodal.training.selection import write_best

    config = load_config(["tiny"], [f"run_dir={tmp_path}", "model.decoupler={name: typed_slots}", f"train.steps={STEPS}"])
    tokenizer = TextTokenizer.train(TEXTS, vocab_size=300)
    tokenizer.save(tmp_path / TOKENIZER_FILE)
    dump_config(config, tmp_path / "config.yaml")
    model = build_model(config, data_shapes(config, tokenizer, build_collator(tokenizer, config.data)))
    save_checkpoint(tmp_path, step=STEPS, model=model, optimizer=None, scheduler=None, extra_state={})
    write_best(tmp_path, model, step=5, figure="audio_to_text/exact", value=0.5)
    best = load_run(tmp_path, checkpoint="best")
    assert best.checkpoint.endswith("best")
    assert best.model.contrastive.decoupler.gate.value == pytest.approx((training_progress(4, STEPS) - 0.3) / 0.3)
