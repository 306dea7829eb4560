"""The decoupling modules and the modality-aware mixture of experts inside the any-to-any model, by
one config line each: they train with every task of the ``tiny`` preset, their own losses and stats
join the step's, the contrastive embedding of a task's pass still equals a pass over the source
alone, and a mixture-of-experts backbone routes every modality's tokens to its private experts."""

from __future__ import annotations

import pytest
import torch
from batches import SHAPES, assert_task_pass_embeddings_equal_embed, make_batch

from polymodal.config import load_config
from polymodal.decoupling import DECOUPLERS
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

DECOUPLER_LOSSES = {
    "query_bank": {"private_image", "private_decorrelation_image_text"},
    "typed_slots": {"leakage"},
    "shared_private": {"align_image_text", "independence_image", "reconstruction_text"},
}
POOLED_ONLY = ("out_norm.", "fuse.")  # the decouplers' layers after the shared/private split
MOE = "model.backbone.moe={layers: [1], num_shared_experts: 2, num_private_experts: 1, top_k: 2, capacity_factor: null}"


def _model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config(["tiny"], list(overrides)), SHAPES)


@pytest.mark.parametrize("name", DECOUPLERS.names())
def test_each_decoupler_trains_in_the_preset_by_one_line(name):
    model = _model(f"model.decoupler={{name: {name}}}").train()
    assert model.contrastive.decoupler is not None  # a part of the contrastive task
    model.contrastive.decoupler.set_progress(0.8)  # the shared branch open (the loop does this each step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = model(make_batch())
    assert DECOUPLER_LOSSES[name] <= set(first.losses), sorted(first.losses)
    assert {"contrastive_image_text", "image_to_text", "text_to_audio"} <= set(first.losses)
    for _ in range(5):
        optimizer.zero_grad()
        sum(model(make_batch()).losses.values()).backward()
        optimizer.step()
    last = model(make_batch())
    assert all(torch.isfinite(v) for v in last.losses.values())
    assert sum(last.losses.values()) < sum(first.losses.values())
    # Every decoupler weight trains but those that only make the ``pooled`` summary (private plus
    # gated shared), which the model exposes and no loss of the preset reads: InfoNCE acts on ``shared``.
    trained = {n for n, p in model.contrastive.decoupler.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    untrained = {n for n, _ in model.contrastive.decoupler.named_parameters()} - trained
    assert trained and all(n.startswith(POOLED_ONLY) for n in untrained), sorted(untrained)


@pytest.mark.parametrize("name", DECOUPLERS.names())
def test_embeddings_from_task_passes_equal_passes_over_each_source_alone(name):
    model = _model(f"model.decoupler={{name: {name}}}").eval()
    model.contrastive.decoupler.set_progress(1.0)
    assert_task_pass_embeddings_equal_embed(model, make_batch())

def test_a_decoupler_needs_the_contrastive_task():
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match="model.decoupler: a decoupler summarises what the contrastive task aligns"):
        load_config(["tiny"], ["model.decoupler={name: query_bank}", "model.tasks=[image_to_text]"])


def test_the_mixture_of_experts_routes_each_modality_to_its_private_experts():
    model = _model(MOE).train()
    out = model(make_batch())
    assert {"moe_load_balance", "moe_router_z"} <= set(out.losses)
    # Experts: 2 shared, then one private per modality in MODALITY_INDEX order (image, text, audio).
    for index, modality in enumerate(Modality):
        private = 2 + index
        assert out.metrics[f"moe_usage_{modality}_e{private}"] > 0, modality
        others = [2 + i for i in range(len(Modality)) if i != index]
        assert all(out.metrics[f"moe_usage_{modality}_e{j}"] == 0 for j in others)
    sum(out.losses.values()).backward()
    experts = [p for n, p in model.backbone.named_parameters() if "experts" in n]
    assert experts and all(p.grad is not None for p in experts)


def test_cached_generation_equals_recomputation_with_a_mixture_of_experts():
    model = _model(MOE).eval()
    batch = make_batch()
    kwargs = dict(max_new_tokens=6)
    cached = model.generate(Modality.AUDIO, Modality.TEXT, batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO], use_cache=True, **kwargs)
    full = model.generate(Modality.AUDIO, Modality.TEXT, batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO], use_cache=False, **kwargs)
    assert cached == full
