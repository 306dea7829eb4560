"""Live diagnostics on a tiny any-to-any model: the measured values against the library functions
and a dense Gram-matrix CKA written here, on states recomputed through the model's own source
pass; the probe is the same items every time; a measurement leaves weights, mode and every RNG as
they were, so training with diagnostics on is bitwise training without them, and a crashed run
resumed with them on ends bitwise like an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import numpy as np
import pytest
import safetensors.torch
import torch

from polymodal.config import load_config
from polymodal.data.batch import Sample
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.diagnostics import effective_rank, gradient_conflict, leakage_ratio
from polymodal.diagnostics.live import measure, typed_attention
from polymodal.diagnostics.live_hook import DIAGNOSTICS_FILE, LiveDiagnostics, live_diagnostics
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.architectures import build_model
from polymodal.models.sequence import masked_mean
from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.loop import fit
from polymodal.training.metrics_log import MetricsLogger
from polymodal.training.probe import DiagnosticsSettings, diagnostics_settings, probe_indices
from polymodal.training.run import data_shapes

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven")
SAMPLE_RATE = 16000
OVERRIDES = [
    "model.tasks=[image_to_text,audio_to_text,contrastive]", "data.num_mels=16", "data.max_audio_seconds=0.5",
    "model.backbone.dropout=0.1", "data.max_text_tokens=8", "device=cpu", "train.precision=fp32", "train.progress=false",
]  # fmt: skip


def toy_samples(count: int, seed: int) -> list[Sample]:
    """Images, captions and tones that all follow one label, so the modalities share structure."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        label = int(rng.integers(len(WORDS)))
        image = 0.1 * rng.random((1, 32, 96), dtype=np.float32)
        image[:, :, label * 12 : label * 12 + 12] += 0.8
        t = np.arange(int(SAMPLE_RATE * rng.uniform(0.2, 0.45))) / SAMPLE_RATE
        audio = 0.5 * np.sin(2 * np.pi * (200 + 100 * label) * t).astype(np.float32)
        samples.append(Sample(torch.from_numpy(image.clip(0, 1)), f"the number {WORDS[label]}", torch.from_numpy(audio), label))
    return samples


@pytest.fixture(scope="module")
def toy():
    config = load_config(["tiny"], OVERRIDES)
    train, val = toy_samples(48, seed=0), toy_samples(24, seed=1)
    tokenizer = TextTokenizer.train([s.text for s in train], vocab_size=280)
    collator = build_collator(tokenizer, config.data)
    return config, train, val, collator, data_shapes(config, tokenizer, collator)


def make_model(toy, seed: int = 0, **extra):
    config, *_, shapes = toy
    torch.manual_seed(seed)
    model = build_model(config if not extra else load_config(["tiny"], [*OVERRIDES, *extra["overrides"]]), shapes)
    return model.eval()


def unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA with the unbiased HSIC (Song et al. 2012), from dense Gram matrices."""
    def hsic(k, l):
        n = k.shape[0]
        k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
        ones = torch.ones(n, dtype=k.dtype)
        return ((k * l).sum() + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2)) - 2 * (ones @ k @ l @ ones) / (n - 2)) / (n * (n - 3))
    k, l = x.double() @ x.double().T, y.double() @ y.double().T
    return float(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)))


def test_measurement_equals_the_library_on_the_source_pass_states(toy):
    _, _, val, collator, _ = toy
    model = make_model(toy)
    probe, few = collator(val[:16]), collator(val[:6])
    result = measure(model, probe, few)
    assert result.modalities == (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)
    assert result.layers == ("L0", "L1", "L2") and result.num_items == 16
    pooled = {}
    with torch.no_grad():
        for m in result.modalities:
            tokens, valid = model.encode(m, probe.inputs[m], probe.masks.get(m))
            final = model.source_states(tokens, valid)  # the model's own source pass
            hidden = model.backbone.forward_intermediates(tokens, mask=(valid[:, None, :] | torch.eye(valid.shape[1], dtype=torch.bool))[:, None]).hidden
            pooled[m] = [masked_mean(tokens, valid), *(masked_mean(h, valid) for h in hidden)]
            assert result.effective_rank[m] == pytest.approx(effective_rank(masked_mean(final, valid), center=True), rel=1e-9)
    labels = [(m, k) for m in result.modalities for k in range(3)]
    for i, (a, la) in enumerate(labels):
        for j, (b, lb) in enumerate(labels):
            assert result.cka[i, j].item() == pytest.approx(unbiased_cka(pooled[a][la], pooled[b][lb]), abs=1e-6), (a, la, b, lb)
    for (a, b), per_layer in result.cross_modal().items():
        assert per_layer == pytest.approx([unbiased_cka(pooled[a][k], pooled[b][k]) for k in range(3)], abs=1e-6)
    expected = gradient_conflict(model(few).losses, list(model.backbone.parameters()))
    assert result.conflict.names == expected.names == ("image_to_text", "audio_to_text", *(
        f"contrastive_{p}" for p in ("image_text", "audio_text", "image_audio")))
    torch.testing.assert_close(result.conflict.cosine, expected.cosine, rtol=1e-6, atol=1e-9)
    assert not result.experts and not result.leakage  # a dense backbone, no decoupler


def test_scalars_and_record_say_the_same_as_the_measurement(toy):
    _, _, val, collator, _ = toy
    result = measure(make_model(toy), collator(val[:8]), collator(val[:4]))
    scalars, record = result.scalars(), json.loads(json.dumps(result.record()))
    width = len(result.layers)
    assert scalars["cka/image-audio/L2"] == pytest.approx(result.cka[0 * width + 2, 2 * width + 2].item())
    assert scalars["cka/text-audio/L0"] == pytest.approx(record["cka"][1 * width][2 * width])
    cosines = [scalars[k] for k in scalars if k.count("/") == 2 and k.startswith("conflict/")]
    assert len(cosines) == 10 and scalars["conflict/min"] == pytest.approx(min(cosines))
    assert record["gradient_conflict"]["names"] == list(result.conflict.names)
    assert record["effective_rank"] == {str(m): pytest.approx(v) for m, v in result.effective_rank.items()}


def test_expert_usage_and_leakage_come_from_the_models_own_parts(toy):
    _, _, val, collator, _ = toy
    moe = "model.backbone.moe={layers: [1], num_shared_experts: 2, num_private_experts: 1, top_k: 1}"
    model = make_model(toy, overrides=[moe, "model.decoupler={name: typed_slots}"])
    probe = collator(val[:12])
    result = measure(model, probe)
    usage = result.experts[1]
    assert usage.modalities == (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)
    torch.testing.assert_close(usage.share.sum(dim=1), torch.ones(3, dtype=torch.float64))
    # Experts [shared 0, 1][image 2][text 3][audio 4]: a private expert sees only its modality's tokens.
    for row in range(3):
        others = [2 + k for k in range(3) if k != row]
        assert usage.share[row, others].sum().item() == 0.0
    assert result.conflict is None and "experts/block1/text/entropy" in result.scalars()
    with torch.no_grad():  # the slots' leakage, recomputed from the decoupler run on states made here
        states, masks = {}, {}
        for m in Modality:
            tokens, valid = model.encode(m, probe.inputs[m], probe.masks.get(m))
            with model.routing.of(m):
                states[m], masks[m] = model.source_states(tokens, valid), valid
        expected = leakage_ratio(typed_attention(model.contrastive.decoupler(states, masks).attention["slots"]))
    got = result.leakage["slots"]
    assert set(got.per_type) == set(Modality) and all(0.0 < v < 1.0 for v in got.per_type.values())
    for m, value in expected.per_type.items():
        assert got.per_type[m] == pytest.approx(value, abs=1e-5)
    banks = measure(make_model(toy, overrides=["model.decoupler={name: query_bank}"]), probe).leakage
    assert banks["private"].per_type == {m: 0.0 for m in Modality}  # a private bank reads its own keys only


def test_the_probe_is_the_same_items_every_time(toy):
    _, _, val, collator, _ = toy
    lacking = [Sample(image=s.image, text=s.text, label=s.label) for s in val[:6]]  # no audio
    dataset = [*lacking, None, *val]
    first = probe_indices(dataset, list(Modality), items=10, seed=3)
    assert first == probe_indices(dataset, list(Modality), items=10, seed=3)  # seeded: as after a resume
    assert first != probe_indices(dataset, list(Modality), items=10, seed=4)
    assert len(first) == 10 and all(i >= 7 for i in first)  # items lacking a modality, or missing, are passed over
    assert len(probe_indices(dataset, [Modality.IMAGE, Modality.TEXT], items=40, seed=3)) == 30  # those 6 count now
    hook = LiveDiagnostics(dataset, collator, DiagnosticsSettings(every=1, items=10, conflict_items=4),
                           modalities=list(Modality), seed=3, steps=5, run_dir="unused")  # fmt: skip
    probe, few = hook.probe(torch.device("cpu"))
    again, _ = hook.probe(torch.device("cpu"))
    assert hook.indices == first and probe.size == 10 and few.size == 4
    assert torch.equal(probe.labels, torch.tensor([dataset[i].label for i in first]))
    assert torch.equal(few.labels, probe.labels[:4])  # the conflict batch is the probe's first items
    for m in Modality:
        assert torch.equal(probe.inputs[m], again.inputs[m])


def test_a_measurement_leaves_weights_mode_and_random_streams_alone(toy, tmp_path):
    _, _, val, collator, _ = toy
    model = make_model(toy).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = LiveDiagnostics(val, collator, DiagnosticsSettings(every=2, items=8, conflict_items=4),
                           modalities=list(Modality), seed=0, steps=5, run_dir=tmp_path)  # fmt: skip
    torch.manual_seed(5)
    np.random.seed(5)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(5)
    np.random.seed(5)
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 2, 3, 5):
            hook(model, step, logger)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    records = [json.loads(line) for line in (tmp_path / DIAGNOSTICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 5]  # every 2nd step and the last
    diag = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in diag if e["split"] == "diag"] == [2, 5] and "cka/image-text/L1" in diag[0]
    assert records[0]["cka"] == records[1]["cka"]  # same weights, same probe: the same measurement


def _fit(toy, run_dir, *, diagnostics: bool, resume: bool = False, crash_at: int | None = None):
    config, train, val, collator, _ = toy
    config = load_config(["tiny"], [*OVERRIDES, "train.steps=4", "train.batch_size=8", "train.log_every=1",
                                    "train.ckpt_every=2", "train.keep_checkpoints=3", "train.warmup_steps=1"])  # fmt: skip
    model = make_model(toy, seed=1)
    hook = LiveDiagnostics(val, collator, DiagnosticsSettings(every=2, items=12, conflict_items=4),
                           modalities=list(Modality), seed=config.seed, steps=4, run_dir=run_dir) if diagnostics else None  # fmt: skip

    def diagnose(model, step, logger):
        if step == crash_at:
            raise KeyboardInterrupt  # killed after step 2's checkpoint, before step 3's
        if hook is not None:
            hook(model, step, logger)

    fit(model, train, collator, config, run_dir, resume=resume, diagnose=diagnose)
    return safetensors.torch.load_file(latest_checkpoint(run_dir) / "model.safetensors")


@pytest.mark.slow
def test_training_with_diagnostics_is_bitwise_training_without_and_resumes_exactly(toy, tmp_path):
    plain = _fit(toy, tmp_path / "plain", diagnostics=False)
    measured = _fit(toy, tmp_path / "measured", diagnostics=True)
    with pytest.raises(KeyboardInterrupt):
        _fit(toy, tmp_path / "resumed", diagnostics=True, crash_at=3)
    resumed = _fit(toy, tmp_path / "resumed", diagnostics=True, resume=True)
    for name in plain:
        assert torch.equal(measured[name], plain[name]) and torch.equal(resumed[name], plain[name]), name
    def records(run):
        lines = (tmp_path / run / DIAGNOSTICS_FILE).read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("time", "seconds")} for line in lines]
    assert [r["step"] for r in records("measured")] == [2, 4]
    assert records("resumed") == records("measured")


def test_settings_are_checked_at_config_load():
    assert diagnostics_settings({}) == DiagnosticsSettings() and not DiagnosticsSettings().enabled
    assert load_config(["tiny"], ["train.diagnostics.every=5"]).train.diagnostics == {"every": 5}
    for override, message in (
        ("train.diagnostics.evry=5", "train.diagnostics.evry: unknown setting; valid: every, items, conflict_items"),
        ("train.diagnostics.items=2", "train.diagnostics.items: expected an integer >= 4, got 2"),
        ("train.diagnostics.every=-1", "train.diagnostics.every: expected an integer >= 0"),
        ("train.diagnostics.conflict_items=300", "train.diagnostics.conflict_items: 300 exceeds items 256"),
        ("tokenizer_train.diagnostics=5", "tokenizer_train.diagnostics: expected a mapping"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config(["tiny"], [override])


def test_the_hook_is_made_only_when_on_and_for_a_model_with_a_shared_backbone(toy, tmp_path, caplog):
    config, _, val, collator, _ = toy
    run = types.SimpleNamespace(model=make_model(toy), splits=types.SimpleNamespace(val=val), collator=collator, config=config, run_dir=tmp_path)
    assert live_diagnostics(run, config.train) is None  # off unless asked for
    train = dataclasses.replace(config.train, diagnostics={"every": 3})
    hook = live_diagnostics(run, train)
    assert [s for s in range(1, train.steps + 1) if hook.due(s)] == [3, 6, 9, 12, 15, 18, 20]  # and the last
    run.model = torch.nn.Linear(2, 2)  # e.g. an image tokenizer stage: nothing shared to measure
    assert live_diagnostics(run, train) is None
    assert "has no shared backbone to measure" in caplog.text
