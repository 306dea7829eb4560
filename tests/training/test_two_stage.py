"""The two-stage job (VQ-VAE, then any-to-any): a run stopped between the stages resumes into the
second without retraining the first, and the frozen tokenizer inside the model is stage 1's."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch

from polymodal.config import load_config
from polymodal.errors import ConfigError
from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.compile import check_compiler
from polymodal.training.job import TOKENIZER_STAGE_DIR, plan_stages, train, train_stage


def test_a_run_stopped_after_stage_one_resumes_into_stage_two(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    config = load_config(
        ["tiny"],
        [f"run_dir={run_dir}", "data.options.num_samples=200", "train.steps=4", "train.progress=false", "tokenizer_train.progress=false"],
    )
    first, second = plan_stages(config)
    assert first.run_dir == run_dir / TOKENIZER_STAGE_DIR and second.config == config
    train_stage(first, None)  # as if the job had been killed right after stage 1
    stage_checkpoint = latest_checkpoint(run_dir / TOKENIZER_STAGE_DIR)
    stage_weights = safetensors.torch.load_file(str(stage_checkpoint / "model.safetensors"))

    with pytest.raises(ConfigError, match="already holds a run"):
        train(config)  # never overwrites a started run
    train(config, resume=True)

    assert latest_checkpoint(run_dir / TOKENIZER_STAGE_DIR) == stage_checkpoint  # stage 1 not retrained
    model_weights = safetensors.torch.load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    tokenizer_keys = [k for k in stage_weights if k.startswith("tokenizer.")]
    assert tokenizer_keys
    for key in tokenizer_keys:  # "tokenizer.X" in stage 1 is the image head's "tokenizer.X" in the model
        assert torch.equal(model_weights["heads.image." + key], stage_weights[key]), key


def test_a_job_stopped_inside_stage_one_resumes_from_the_command_line(tmp_path, monkeypatch):
    """The job's own config.yaml is written before stage 1, so `polymodal train --resume` (which
    reads it) continues a run stopped before the model's stage ever started."""
    from polymodal.cli.main import main
    from polymodal.training import job

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "data.options.num_samples=200", "train.steps=4", "train.progress=false", "tokenizer_train.progress=false"]
    real_evaluation = job.evaluate_run

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # stage 1 trained and checkpointed, stopped before its test figures

    monkeypatch.setattr(job, "evaluate_run", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(["tiny"], overrides))
    assert latest_checkpoint(run_dir) is None and not (run_dir / TOKENIZER_STAGE_DIR / "eval.json").exists()
    monkeypatch.setattr(job, "evaluate_run", real_evaluation)
    assert main(["train", "--resume", f"run_dir={run_dir}"]) == 0
    assert (run_dir / TOKENIZER_STAGE_DIR / "eval.json").is_file()
    assert latest_checkpoint(run_dir).name == "step_0000004"


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (["train.diagnostics.every=5"], "train.diagnostics"),
        (["train.select=image_to_text/exact", "train.eval_every=5"], "train.select"),
        (["train.gradient_surgery.name=pcgrad"], "train.gradient_surgery"),
    ],
)
def test_sharding_that_the_second_stage_refuses_stops_the_job_before_the_first_trains(tmp_path, monkeypatch, settings, key):
    """``train.fsdp`` with a setting it does not support fails at once, before stage 1's training,
    whose minutes the user would otherwise lose."""
    import polymodal.distributed.fsdp as fsdp

    monkeypatch.setattr(fsdp, "world_size", lambda: 2)  # as one of 2 ranks; the check needs no process group
    run_dir = tmp_path / "run"
    config = load_config(["tiny"], [f"run_dir={run_dir}", "train.fsdp=true", *settings])
    with pytest.raises(ConfigError, match=f"train.fsdp=true does not support {key} yet"):
        train(config)
    assert latest_checkpoint(run_dir / TOKENIZER_STAGE_DIR) is None


def test_train_compile_without_a_cpp_compiler_stops_the_job_before_the_first_trains(tmp_path, monkeypatch):
    """TorchInductor builds its CPU kernels with a C++ compiler; without one, ``train.compile``
    would fail at stage 2's first compiled step, after stage 1 had trained."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("polymodal-no-such-compiler",))
    run_dir = tmp_path / "run"
    config = load_config(["tiny"], [f"run_dir={run_dir}", "train.compile=true", "device=cpu"])
    with pytest.raises(ConfigError, match=r"train.compile=true: .* found none .* or set train.compile=false"):
        train(config)
    assert latest_checkpoint(run_dir / TOKENIZER_STAGE_DIR) is None
    check_compiler(dataclasses.replace(config.train, compile=False), "cpu")  # off: nothing asked of the machine


def test_the_tokenizer_stage_trains_on_images_as_they_are_and_the_model_on_augmented_ones(tmp_path):
    """``data.augment`` is for the model: the image tokenizer's stage gets the same data settings
    with augmentation off, since its codes are the targets text->image learns."""
    overrides = [f"run_dir={tmp_path / 'run'}", "data.augment.image.affine_p=0.5", "data.augment.audio.speed_p=0.5"]
    config = load_config(["tiny"], overrides)
    first, second = plan_stages(config)
    assert second.config == config
    assert first.config.data.augment == load_config(["tiny"], []).data.augment  # all off
    assert dataclasses.replace(first.config.data, augment=config.data.augment) == config.data
