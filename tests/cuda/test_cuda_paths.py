"""The CUDA paths against the CPU, on a machine with a GPU (skipped without one; CI has none).

- Every head inside a small model, and every shipped preset's model: the losses that draw nothing
  are the CPU's on the GPU (fp32, TF32 off), with the CPU's gradients; every loss trains a step
  under bf16 autocast (finite, a gradient on every parameter the CPU's fp32 step reaches).
- Generation on the GPU is the CPU's: a seeded CPU generator draws the same noise and tokens on
  either device.
- Compiled transformer blocks (inductor, Triton kernels on a GPU) compute what the eager ones do.
- The command line trains, evaluates, resumes and generates a tiny run on the GPU, and the run
  loads again on the CPU; launched with one rank per GPU, it trains and evaluates over NCCL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from batches import SHAPES, head_config, make_batch, preset_needs
from torch import nn

from polymodal.config import load_config, preset_names
from polymodal.heads import HEADS, generation_options
from polymodal.modality import Modality
from polymodal.models.architectures import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")
# The latent flow head's scale, else set by its first training batch (these tests start in eval mode).
LATENT_SCALE = {"flow_matching_latent": ["model.heads.image.latent_scale=1.0"]}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 matmuls and convolutions in full fp32 (TF32 keeps 10 mantissa bits), so the GPU can be
    held to the CPU's figures."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _head_config(name: str):
    return head_config(name, *LATENT_SCALE.get(name, []))[0]


def _pair(config) -> tuple[nn.Module, nn.Module]:
    """The same weights on the CPU and on the GPU."""
    torch.manual_seed(0)
    cpu = build_model(config, SHAPES)
    gpu = build_model(config, SHAPES)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(GPU)


def _losses(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the CPU's and every GPU's generator
    device = next(model.parameters()).device
    return model(make_batch().to(device)).losses


def _drawing_nothing(model: nn.Module) -> set[str]:
    """The losses whose value does not move with the global RNG (on the CPU, in eval mode)."""
    with torch.no_grad():
        first, second = _losses(model, 1), _losses(model, 2)
    return {name for name, value in first.items() if torch.equal(value, second[name])}


def _check_against_cpu(config) -> None:
    cpu, gpu = _pair(config)
    cpu.eval(), gpu.eval()  # no dropout: the same function on both
    fixed = _drawing_nothing(cpu)
    want, got = _losses(cpu, 1), _losses(gpu, 1)
    assert set(got) == set(want)
    for name in fixed:
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-4, atol=1e-5, msg=name)
    if fixed:
        sum(want[name] for name in fixed).backward()
        sum(got[name] for name in fixed).backward()
        for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
            if p.grad is None:
                assert q.grad is None or not q.grad.any(), name
            else:
                torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)
    # A training step under bf16 autocast reaches every parameter the CPU's fp32 step reaches.
    for model in (cpu, gpu):
        model.zero_grad(set_to_none=True)
        model.train()
    sum(_losses(cpu, 3).values()).backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = _losses(gpu, 3)
    assert all(torch.isfinite(value) for value in losses.values()), {k: v.item() for k, v in losses.items()}
    sum(losses.values()).backward()
    reached = [(n, q) for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()) if p.grad is not None and p.grad.any()]
    assert reached
    missing = [n for n, q in reached if q.grad is None or not q.grad.any() or not torch.isfinite(q.grad).all()]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_computes_the_cpus_losses_and_trains_in_bf16(name):
    _check_against_cpu(_head_config(name))


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_computes_the_cpus_losses_and_trains_in_bf16(preset):
    _check_against_cpu(load_config([preset], preset_needs(preset)))


def _mostly_equal(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Same shape, and all but 1% of the elements within ``atol`` (a sampled code or a rounded
    duration may tip the other way on a last-bit difference)."""
    assert got.shape == want.shape
    close = torch.isclose(got.cpu().float(), want.float(), atol=atol, rtol=0)
    assert close.float().mean() >= 0.99, f"{(~close).float().mean():.3f} of the elements differ"


@pytest.mark.parametrize("name", HEADS.names())
def test_generation_on_the_gpu_is_the_cpus(name):
    target = HEADS.get(name).target
    cpu, gpu = _pair(_head_config(name))
    cpu.eval(), gpu.eval()
    batch = make_batch()
    source = Modality.IMAGE if target is Modality.TEXT else Modality.TEXT
    inputs, mask = batch.inputs[source], batch.masks.get(source)
    made = []
    for model in (cpu, gpu):
        options = generation_options(model.head(target), generator=torch.Generator().manual_seed(5), temperature=0.9)
        device = next(model.parameters()).device
        with torch.no_grad():
            made.append(model.generate(source, target, inputs.to(device), None if mask is None else mask.to(device), **options))
    want, got = made
    if target is Modality.TEXT:
        assert got == want  # token ids per item
    else:
        assert got.device.type == "cuda"
        _mostly_equal(got, want, atol=1e-3)


def test_compiled_blocks_match_eager_on_the_gpu():
    from polymodal.backbones import BACKBONES
    from polymodal.models.masks import prefix_lm_mask
    from polymodal.training.compile import compiled_blocks

    torch.manual_seed(0)
    model = BACKBONES.build({"name": "transformer", "num_layers": 2, "num_heads": 4}, 64).to(GPU)

    def step(lengths: list[int]) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(sum(lengths))
        n = max(lengths) + 3
        tokens = torch.randn(len(lengths), n, 64, generator=generator).to(GPU)
        valid = (torch.arange(n)[None] < torch.tensor(lengths)[:, None] + 3).to(GPU)
        is_target = (torch.arange(n)[None] >= torch.tensor(lengths)[:, None]).to(GPU) & valid
        out = model(tokens, mask=prefix_lm_mask(is_target, valid))
        out[valid].square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return [out.detach(), *grads]

    shapes = [[5, 2, 4], [7, 1, 1, 6], [3, 3]]
    eager = [step(lengths) for lengths in shapes]
    with compiled_blocks(model) as count:
        assert count == 2
        compiled = [step(lengths) for lengths in shapes]
    for got_step, want_step in zip(compiled, eager):
        for got, want in zip(got_step, want_step):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_cli_trains_evaluates_resumes_and_generates_on_the_gpu(tmp_path, monkeypatch, capsys):
    from polymodal.cli.main import main
    from polymodal.training.checkpoint import latest_checkpoint
    from polymodal.training.run import load_run

    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    common = [f"run_dir={run_dir}", "data.options.num_samples=200", "train.progress=false", "device=cuda"]
    assert main(["train", "--config", "tiny", "train.steps=6", "train.ckpt_every=3", *common]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("mfu", 0) <= 1 for r in records)  # against the GPU's own measured peak
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert 0.0 <= figures["image_to_text"]["exact"] <= 1.0 and 0.0 <= figures["text_to_image"]["probe_correct"] <= 1.0
    state = torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=False)
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()  # the GPU's RNG state is saved with the run

    assert main(["train", "--resume", f"run_dir={run_dir}", "train.steps=8"]) == 0
    assert max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()) == 8

    png, wav = tmp_path / "forty_two.png", tmp_path / "forty_two.wav"
    for args in (["--to", "image", "--out", str(png)], ["--to", "audio", "--out", str(wav), "--seed", "3"]):
        assert main(["generate", str(run_dir), "--from", "text", "forty two", *args]) == 0
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--from", "audio", str(wav), "--to", "text", "--temperature", "0.8"]) == 0
    assert capsys.readouterr().out.count("\n") == 1

    # `eval` and `generate` load the run on the GPU; without one, the same weights load on the CPU
    # and caption as they do on the GPU.
    gpu_run = load_run(run_dir)
    assert next(gpu_run.model.parameters()).device.type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_run = load_run(run_dir)
    assert next(cpu_run.model.parameters()).device.type == "cpu"
    images = make_batch().inputs[Modality.IMAGE]
    with torch.no_grad():
        on_cpu = cpu_run.model.eval().generate(Modality.IMAGE, Modality.TEXT, images)
        on_gpu = gpu_run.model.eval().generate(Modality.IMAGE, Modality.TEXT, images.to(GPU))
    assert on_cpu == on_gpu


def test_one_rank_per_gpu_trains_and_evaluates_over_nccl(tmp_path):
    """``--nproc-per-node`` with every GPU: NCCL's process group, DDP on the GPUs, gathered
    contrastive negatives and the evaluation shared out over the ranks."""
    env = dict(os.environ, POLYMODAL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="4")
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "polymodal", "train", "--nproc-per-node", str(torch.cuda.device_count()), "--config", "tiny",
        "device=cuda", f"run_dir={run_dir}", "data.options.num_samples=200", "train.progress=false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((run_dir / "eval.json").read_text())["figures"]
    assert 0.0 <= figures["audio_to_text"]["exact"] <= 1.0 and set(figures["retrieval_image_to_text"]) >= {"R@1"}
