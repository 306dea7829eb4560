"""Every registered image tokenizer, head, task and architecture: builds on the meta device with the
same shapes as on the CPU, a finite loss with a gradient on every trainable parameter, and a
state-dict round trip that reproduces the output exactly. Heads are checked inside the smallest
any-to-any model that uses them (``tiny``, one task); architectures through every shipped preset."""

from __future__ import annotations

import pytest
import torch
from batches import SHAPES, head_config, make_batch, preset_needs
from torch import nn

from polymodal.config import load_config, preset_names
from polymodal.heads import HEADS
from polymodal.modality import Modality
from polymodal.models.architectures import ARCHITECTURES, build_model, on_meta
from polymodal.tasks import TASKS
from polymodal.tokenizers import IMAGE_TOKENIZERS

IMAGES = torch.rand(2, 1, 32, 96) * 2 - 1


def _meta_matches(build) -> None:
    with on_meta():
        meta = build()
    real = build()
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}


def _trainable_without_gradient(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]


@pytest.mark.parametrize("name", IMAGE_TOKENIZERS.names())
def test_image_tokenizer_conforms(name):
    build = lambda: IMAGE_TOKENIZERS.build({"name": name, "channels": 16, "dim": 8, "num_res_blocks": 1}, where=name)  # noqa: E731
    _meta_matches(build)
    torch.manual_seed(0)
    tokenizer = build()
    losses = tokenizer.training_step(IMAGES).losses
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert not _trainable_without_gradient(tokenizer)
    clone = build()
    clone.load_state_dict(tokenizer.state_dict())
    with torch.no_grad():
        assert torch.equal(tokenizer.eval().reconstruct(IMAGES), clone.eval().reconstruct(IMAGES))


def _main_loss(losses: dict, task: str) -> str:
    """The head's main term: ``task`` itself, or its first named sub-term (``text_to_image_flow_matching``)."""
    names = [k for k in losses if k == task or k.startswith(f"{task}_")]
    assert names, f"no loss of {task} in {sorted(losses)}"
    return task if task in names else names[0]


@pytest.mark.parametrize("name", HEADS.names())
def test_head_conforms_inside_a_model(name):
    config, task = head_config(name)
    build = lambda: build_model(config, SHAPES)  # noqa: E731
    _meta_matches(build)
    torch.manual_seed(0)
    model = build()
    losses = model(make_batch()).losses
    main = _main_loss(losses, task)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = model.head(HEADS.get(name).target)
    assert not _trainable_without_gradient(head)
    clone = build()
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    with torch.no_grad():  # the same draws for both (a flow head samples noise and times)
        torch.manual_seed(1)
        ours = model(make_batch()).losses[main]
        torch.manual_seed(1)
        assert torch.equal(ours, clone(make_batch()).losses[main])


@pytest.mark.parametrize("name", TASKS.names())
def test_task_builds_on_meta_and_round_trips(name):
    modalities = list(Modality)
    build = lambda: TASKS.build({"name": name}, 32, modalities)  # noqa: E731
    _meta_matches(build)
    task, clone = build(), build()
    clone.load_state_dict(task.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(task.state_dict().values(), clone.state_dict().values()))


@pytest.mark.parametrize("preset", preset_names())
def test_every_architecture_of_every_preset_builds_alike_on_meta(preset):
    config = load_config([preset], preset_needs(preset))
    assert config.model.architecture in ARCHITECTURES
    _meta_matches(lambda: build_model(config, SHAPES))
