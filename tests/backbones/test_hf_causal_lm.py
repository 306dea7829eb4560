"""The Hugging Face causal-LM backbone: our prefix-LM mask against HF's own causal path and across
attention kernels, cached against uncached generation, padding invariance, freezing policies that
change only what they allow while image->text training lowers the loss, and the errors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be fetched from a hub during the tests

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from polymodal.backbones import BACKBONES  # noqa: E402
from polymodal.backbones.hf_causal_lm import FREEZE_POLICIES, HFCausalLMBackbone, apply_freeze_policy  # noqa: E402
from polymodal.config import load_config  # noqa: E402
from polymodal.data.batch import Batch  # noqa: E402
from polymodal.errors import ConfigError  # noqa: E402
from polymodal.modality import Modality  # noqa: E402
from polymodal.models.shapes import TextSpecials  # noqa: E402
from polymodal.models.architectures import build_model  # noqa: E402
from polymodal.models.shapes import DataShapes  # noqa: E402
from polymodal.models.masks import causal_mask, prefix_lm_mask  # noqa: E402

DIM = 64
VOCAB = 40
SPECIALS = TextSpecials(vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2)
SHAPES = DataShapes(image_size=(32, 96), num_mels=16, text=SPECIALS)
HF_VOCAB = 50  # the LM's own vocabulary: its token embedding is unused (tokens come as inputs_embeds)


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=DIM, n_layer=2, n_head=2, vocab_size=HF_VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )


def _llama():
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=DIM,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as in Llama 2/3
            vocab_size=HF_VOCAB,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory) -> dict[str, str]:
    """Tiny randomly initialised GPT-2 and Llama, saved with ``save_pretrained``."""
    folders = {}
    for name, make in (("gpt2", _gpt2), ("llama", _llama)):
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        make().save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def _padded_prefix_mask() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of 5 source + 4 target tokens; item 1 has its last source and target padded."""
    is_target = torch.zeros(2, 9, dtype=torch.bool)
    is_target[:, 5:] = True
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 4] = False
    valid[1, 8] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return prefix_lm_mask(is_target, valid), valid, positions


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_mask_equals_the_lms_own_causal_attention(lm_folders, arch):
    backbone = HFCausalLMBackbone(DIM, path=lm_folders[arch]).eval()
    tokens = torch.randn(2, 7, DIM)
    with torch.no_grad():
        ours = backbone(tokens, mask=causal_mask(7)[None, None].expand(2, 1, 7, 7))
        theirs = backbone.model(inputs_embeds=tokens).last_hidden_state  # HF builds its own causal mask
        default = backbone(tokens)  # no mask: HF's causal mask, our default positions
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eager_and_sdpa_read_the_prefix_mask_the_same_way(lm_folders, arch):
    mask, valid, positions = _padded_prefix_mask()
    tokens = torch.randn(2, 9, DIM)
    with torch.no_grad():
        sdpa = HFCausalLMBackbone(DIM, path=lm_folders[arch], attn_implementation="sdpa").eval()
        eager = HFCausalLMBackbone(DIM, path=lm_folders[arch], attn_implementation="eager").eval()
        a = sdpa(tokens, mask=mask, positions=positions)
        b = eager(tokens, mask=mask, positions=positions)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_lm_mask_bidirectional_source_and_hidden_targets(lm_folders, arch):
    backbone = HFCausalLMBackbone(DIM, path=lm_folders[arch]).eval()
    is_target = torch.zeros(1, 8, dtype=torch.bool)
    is_target[:, 5:] = True
    mask = prefix_lm_mask(is_target, torch.ones(1, 8, dtype=torch.bool))
    tokens = torch.randn(1, 8, DIM)
    later_source, later_target = tokens.clone(), tokens.clone()
    # Random changes: a constant shift would vanish in GPT-2's LayerNorm.
    later_source[:, 4] += torch.randn(DIM)  # the last source token
    later_target[:, 7] += torch.randn(DIM)  # the last target token
    with torch.no_grad():
        base = backbone(tokens, mask=mask)
        after_source = backbone(later_source, mask=mask)
        after_target = backbone(later_target, mask=mask)
    # A causal LM would not let token 0 see token 4; the prefix-LM mask does.
    assert (after_source[:, 0] - base[:, 0]).abs().max() > 1e-3
    # Sources never see targets, and earlier targets never see later ones.
    torch.testing.assert_close(after_target[:, :7], base[:, :7], atol=0, rtol=0)


def test_forward_intermediates_ends_in_the_output(lm_folders):
    backbone = HFCausalLMBackbone(DIM, path=lm_folders["llama"]).eval()
    mask, _, positions = _padded_prefix_mask()
    tokens = torch.randn(2, 9, DIM)
    with torch.no_grad():
        inter = backbone.forward_intermediates(tokens, mask=mask, positions=positions)
        out = backbone(tokens, mask=mask, positions=positions)
    assert len(inter.hidden) == backbone.num_layers == 2
    assert torch.equal(inter.output, out)
    assert torch.equal(inter.hidden[-1], out)  # HF's convention: the last entry is after the final norm


def _model(folder: str, policy: str = "frozen", seed: int = 0):
    config = load_config(
        ["tiny"],
        [f"model.backbone={{name: hf_causal_lm, path: '{folder}', freeze: {policy}}}", "model.tasks=[image_to_text]"],
    )
    for unused in ("audio", "text"):  # image->text only: every part in the model is used
        del config.model.encoders[unused]
    torch.manual_seed(seed)
    model = build_model(config, SHAPES)
    apply_freeze_policy(model, policy)
    return model


def _image_text_batch(batch_size: int = 8, text_len: int = 6) -> Batch:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch_size, text_len), generator=g)
    ids[:, 0] = SPECIALS.bos_id
    text_mask = torch.ones(batch_size, text_len, dtype=torch.bool)
    text_mask[0, 4:] = False
    ids[0, 4:] = SPECIALS.pad_id
    return Batch(
        inputs={Modality.IMAGE: torch.randn(batch_size, 1, 32, 96, generator=g), Modality.TEXT: ids},
        masks={Modality.TEXT: text_mask},
        present={m: torch.ones(batch_size, dtype=torch.bool) for m in (Modality.IMAGE, Modality.TEXT)},
        labels=torch.arange(batch_size),
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_generation_equals_full_recomputation(lm_folders, arch):
    model = _model(lm_folders[arch]).eval()
    images = _image_text_batch().inputs[Modality.IMAGE][:3]
    kwargs = dict(max_new_tokens=8, temperature=0.0)
    cached = model.generate(Modality.IMAGE, Modality.TEXT, images, use_cache=True, **kwargs)
    full = model.generate(Modality.IMAGE, Modality.TEXT, images, use_cache=False, **kwargs)
    assert cached == full
    assert all(len(ids) > 0 for ids in cached)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_a_batch_does_not_change_an_items_logits(lm_folders, arch):
    model = _model(lm_folders[arch]).eval()
    batch = _image_text_batch()
    ids, text_mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    with torch.no_grad():
        source, source_mask = model.encode(Modality.IMAGE, batch.inputs[Modality.IMAGE], None)
        head = model.head(Modality.TEXT)
        batched = head.logits(model, source, source_mask, ids, text_mask)
        alone = head.logits(model, source[:1], source_mask[:1], ids[:1, :4], text_mask[:1, :4])
    torch.testing.assert_close(batched[:1, :4], alone, atol=1e-5, rtol=1e-5)


# Which parameters each policy may change, by name, written out independently of the code under test.
def _allowed(name: str, policy: str) -> bool:
    if name == "backbone.model.wte.weight":  # GPT-2's token embedding: unused, tokens come as inputs_embeds
        return False
    if policy == "full":
        return True
    if policy == "frozen":
        return not name.startswith("backbone.")
    return not name.startswith(("backbone.", "inputs.encoders."))  # projector_only: projectors and model glue


@pytest.mark.parametrize("policy", FREEZE_POLICIES)
def test_training_lowers_the_loss_and_changes_only_what_the_policy_allows(lm_folders, policy):
    model = _model(lm_folders["gpt2"], policy)
    batch = _image_text_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        first = model(batch).losses["image_to_text"].item()
    model.train()
    assert model.backbone.model.training == (policy == "full")  # a frozen LM runs without dropout
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(25):
        loss = model(batch).losses["image_to_text"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        last = model(batch).losses["image_to_text"].item()
    assert last < 0.7 * first, (first, last)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if _allowed(n, policy)}
    assert changed == expected, (sorted(changed - expected), sorted(expected - changed))
    assert any(n.startswith("inputs.projectors.") for n in changed)


def test_policy_keeps_a_self_frozen_encoder_frozen():
    class Frozen(nn.Linear):
        freeze = True

    model = nn.Module()
    model.inputs = nn.Module()
    model.inputs.encoders = nn.ModuleDict({"text": Frozen(3, 3), "image": nn.Linear(3, 3)})
    model.inputs.projectors = nn.ModuleDict({"text": nn.Linear(3, 4)})
    model.backbone = nn.Linear(4, 4)
    model.head = nn.Linear(4, 2)  # model glue (like AnyToAnyModel's text embedding / LM head)
    model.tokenizer = nn.Linear(2, 2).requires_grad_(False)  # frozen by its owner (a head's image tokenizer)
    head = {"head.weight", "head.bias"}
    for policy in FREEZE_POLICIES:
        apply_freeze_policy(model, policy)
        trains = {n.rsplit(".", 1)[0] if n.startswith("inputs.") else n for n, p in model.named_parameters() if p.requires_grad}
        expected = {
            "full": {"inputs.encoders.image", "inputs.projectors.text", "backbone.weight", "backbone.bias", *head},
            "frozen": {"inputs.encoders.image", "inputs.projectors.text", *head},
            "projector_only": {"inputs.projectors.text", *head},
        }[policy]
        assert trains == expected, policy


def test_errors_name_the_problem(lm_folders, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError, match="no_such_model.*nothing is downloaded"):
        HFCausalLMBackbone(DIM, path=str(missing))
    with pytest.raises(ConfigError, match="no config.json"):
        HFCausalLMBackbone(DIM, path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.dim=32.*hidden size 64"):
        HFCausalLMBackbone(32, path=lm_folders["gpt2"])
    with pytest.raises(ConfigError, match="valid: frozen, projector_only, full"):
        BACKBONES.build({"name": "hf_causal_lm", "path": lm_folders["gpt2"], "freeze": "partial"}, DIM)
    with pytest.raises(ConfigError, match="no_such_model"):  # through the assembler too
        _model(str(missing))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        HFCausalLMBackbone(DIM, path=lm_folders["gpt2"]).new_cache(1, 65, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_builds_on_the_meta_device_with_the_same_shapes(lm_folders, arch):
    real = HFCausalLMBackbone(DIM, path=lm_folders[arch], freeze="full")
    with torch.device("meta"):
        meta = HFCausalLMBackbone(DIM, path=lm_folders[arch], freeze="full")
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert [n for n, p in meta.named_parameters() if not p.requires_grad] == ["model." + _embedding_name(arch)]


def _embedding_name(arch: str) -> str:
    return {"gpt2": "wte.weight", "llama": "embed_tokens.weight"}[arch]
