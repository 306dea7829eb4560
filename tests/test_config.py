"""Config tree: merge order, overrides, validation, dump/load round trip, every preset."""

import pytest
import yaml
from batches import preset_needs

from polymodal.config import Config, dump_config, load_config, load_run_config, parse_override, preset_names, to_dict
from polymodal.errors import ConfigError
from polymodal.models.architectures import check_model


def test_merge_order_default_preset_yaml_override(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("train: {steps: 7, lr: 0.5}\nseed: 3\n")
    config = load_config(["tiny", str(user)], ["train.lr=0.25"])
    assert config.data.options == {"num_samples": 400}  # from the tiny preset
    assert config.train.steps == 7  # user YAML beats the preset
    assert config.train.lr == 0.25  # key=value beats the YAML
    assert config.seed == 3
    assert config.train.batch_size == 16  # preset value untouched by the user file


def test_user_yaml_alone_layers_over_default_preset(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("train: {steps: 9}\n")
    config = load_config([str(user)])
    default = load_config(["default"])
    assert config.train.steps == 9
    assert config.model == default.model


def test_changing_a_part_name_drops_the_old_parts_settings():
    config = load_config(["tiny"], ["model.projector={name: mlp, hidden_mult: 2.0}"])
    assert config.model.projector == {"name": "mlp", "hidden_mult": 2.0}
    config = load_config(["tiny"], ["model.encoders.image.name=cnn", "model.encoders.image.num_stages=2"])
    assert config.model.encoders["image"] == {"name": "cnn", "dim": 32, "num_stages": 2}


def test_override_values_are_read_as_yaml():
    assert parse_override("train.betas=[0.9, 0.95]") == {"train": {"betas": [0.9, 0.95]}}
    assert parse_override("train.progress=false") == {"train": {"progress": False}}
    assert parse_override("run_dir=runs/x") == {"run_dir": "runs/x"}


def test_exponent_notation_without_a_dot_is_a_number():
    assert load_config(["tiny"], ["train.lr=2e-3"]).train.lr == 0.002  # YAML 1.1 alone reads a string
    assert load_config(["tiny"], ["train.lr=1E-4"]).train.lr == 0.0001


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; valid: steps,"),
        ("train.steps=many", "train.steps: expected an integer, got 'many'"),
        ("train.precision=fp8", "train.precision: 'fp8' is not valid; valid: auto, bf16, fp32"),
        ("data.source=imagenet", "data.source: 'imagenet' is not valid; valid: manifest, spoken_numbers"),
        ("data.options.num_smaples=9", "data.options.num_smaples: unknown setting of dataset 'spoken_numbers'; valid: flite_share, max_digits, num_samples, recorded_share"),
        ("train.steps=0", "train.steps: must be > 0"),
        ("tokenizer_train.steps=0", "tokenizer_train.steps: must be > 0"),
        ("data.top_db=-5", "data.top_db: must be > 0"),
        ("data.trim_db=0", "data.trim_db: must be > 0"),
        ("steps", "expected key=value"),
    ],
)
def test_bad_values_name_the_key_and_choices(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(["tiny"], [override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.projector.name=mlpp", "model.projector.name: unknown projector 'mlpp'; valid: cross_attention, linear, mlp, qformer"),
        ("model.encoders.image.dimm=3", "model.encoders.image.dimm: unknown setting of encoder 'cnn'"),
        ("model.encoders.smell={name: cnn}", "model.encoders.smell: unknown modality 'smell'"),
        ("model.encoders.image.name=audio_conv", "encodes audio, not image; valid: cnn"),
        ("model.tasks=[image_to_smell]", "model.tasks[0].name: unknown task 'image_to_smell'; valid:"),
        ("model.image_tokenizer.name=vae", "model.heads.image: the aligned_vq head needs a trained VQ image tokenizer"),
        ("model.contrastive.temperature=0.1", "model.contrastive.temperature: unknown setting of task 'contrastive'; valid: embed_dim"),
        ("model.task_fractions.contrastive=0.5", "model.task_fractions.contrastive: not a generation task of this model"),
        ("model.task_fractions.text_to_audio=2", "model.task_fractions.text_to_audio: fraction must lie in (0, 1], got 2"),
        ("model.heads.audio={name: lm}", "model.heads.audio.name: 'lm' makes text, not audio; valid: aligned_mel"),
        ("model.encoders.text.name=cnn", "model.encoders.text.name: 'cnn' encodes image, not text"),
        ("model.backbone.num_heads=3", "model.backbone: dim 64 is not divisible by num_heads 3"),
    ],
)
def test_bad_parts_are_caught_when_the_config_loads(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(["tiny"], [override])
    assert message in str(info.value)


def test_a_task_without_its_source_encoder_names_both():
    config = load_config(["tiny"])
    del config.model.encoders["audio"]
    with pytest.raises(ConfigError, match=r"model.tasks\[1\]: audio_to_text needs a audio encoder; add model.encoders.audio"):
        check_model(config)


def test_generation_from_references_on_a_manifest_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match="model.heads.image: the aligned_vq head learns from aligned references, which data.source=manifest"):
        load_config(["tiny"], ["data.source=manifest", "data.manifest=a.jsonl"])


def test_a_new_source_drops_the_old_sources_options():
    config = load_config(["tiny"], ["data.source=manifest", "data.manifest=a.jsonl", "model.tasks=[image_to_text]"])
    assert config.data.options == {}


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="unknown preset 'tinyy'; valid: .*tiny"):
        load_config(["tinyy"])


def test_dump_then_load_reproduces_the_config(tmp_path):
    config = load_config(["tiny"], ["train.betas=[0.8, 0.9]", f"run_dir={tmp_path}"])
    dump_config(config, tmp_path / "config.yaml")
    again = load_run_config(tmp_path)
    assert again == config
    assert isinstance(again.train.betas, tuple)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(config)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_builds_on_the_meta_device(name):
    config = load_config([name], preset_needs(name))
    assert isinstance(config, Config)
    model = check_model(config)
    assert all(p.is_meta for p in model.parameters()) and sum(p.numel() for p in model.parameters()) > 0


def test_an_empty_mapping_or_list_clears_and_colon_equals_replaces():
    config = load_config(["default"], ["model.task_fractions={}"])
    assert config.model.task_fractions == {}  # the preset's fractions are gone, not merged into
    config = load_config(["default"], ["model.tasks=[image_to_text]", "model.task_fractions={}", "train.loss_weights=[]"] [:2])
    assert config.model.tasks == ["image_to_text"]
    merged = load_config(["tiny"], ["model.heads.image={name: flow_matching}", "model.heads.audio={name: mas_mel}"])
    assert set(merged.model.heads) == {"image", "audio"}  # = merges key by key
    replaced = load_config(["tiny"], ["model.heads.image={name: flow_matching}", "model.heads:={audio: {name: mas_mel}}"])
    assert replaced.model.heads == {"audio": {"name": "mas_mel"}}  # := puts the new mapping in place
    settings = load_config(["tiny"], ["model.heads.image={name: flow_matching, num_queries: 8}", "model.heads.image:={name: flow_matching}"])
    assert settings.model.heads["image"] == {"name": "flow_matching"}  # the old setting does not survive
    assert parse_override("model.task_fractions:={text_to_image: 0.5}")["model"]["task_fractions"].value == {"text_to_image": 0.5}


def test_replacing_works_on_a_run_config_too(tmp_path):
    config = load_config(["default"], [f"run_dir={tmp_path}"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_run_config(tmp_path, ["model.task_fractions={}"]).model.task_fractions == {}


def test_a_vocabulary_smaller_than_the_byte_alphabet_is_refused_with_the_config():
    with pytest.raises(ConfigError, match="data.vocab_size: a byte-level BPE needs at least 259"):
        load_config(["tiny"], ["data.vocab_size=256"])
    for name in preset_names():  # every shipped preset loads (a manifest preset given a manifest)
        load_config([name], ["data.manifest=any.jsonl"])
