"""Configuration: profiles, overrides by name, validation naming the field."""
import json

import pytest

from clipstudy.config import ConfigError, RunConfig, cell_name, config_from_json, make_config, safe_name


def test_profiles_and_overrides():
    paper = make_config("paper")
    # STUDY.md's paper setting
    assert (paper.batch_size, paper.epochs, paper.image_size, paper.temperature) == (128, 30, 256, 0.01)
    assert (paper.weight_decay, paper.warmup_lr, paper.min_lr, paper.max_length) == (0.02, 1e-5, 1e-6, 30)
    assert paper.image_encoder == "resnet50" and paper.text_encoder == "distilbert"
    demo = make_config("demo", epochs="4", lr="1e-3", hflip="false", loss_params='{"gamma": 0.9}')
    assert demo.epochs == 4 and demo.lr == 1e-3 and demo.hflip is False and demo.loss_params == {"gamma": 0.9}
    assert make_config("demo", **{"batch-size": 64}).batch_size == 64


@pytest.mark.parametrize("field, value, words", [
    ("optimizer", "adagrad", ["optimizer", "adamw"]),
    ("loss", "triplet", ["loss", "clip"]),
    ("lr", -1.0, ["lr", ">= 0"]),
    ("epochs", 0, ["epochs", ">= 1"]),
    ("epochs", "many", ["epochs", "int"]),
    ("epochs", 2.5, ["epochs"]),
    ("batch_size", True, ["batch_size"]),
    ("amp", "fp8", ["amp", "bf16"]),
    ("temperature", 0.0, ["temperature"]),
    ("lr", float("nan"), ["lr"]),
    ("label", "../evil", ["label"]),
    ("no_such_field", 1, ["no_such_field"]),
])
def test_invalid_values_name_the_field(field, value, words):
    with pytest.raises(ConfigError) as err:
        make_config("demo", **{field: value})
    for word in words:
        assert word in str(err.value)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="profile"):
        make_config("huge")


def test_resolved_paths_and_roundtrip(tmp_path):
    cfg = make_config("demo", data=str(tmp_path), seed=3, retrieval_ann="/x/coco.json")
    paths = cfg.resolved_paths()
    assert paths["train_ann"] == str(tmp_path / "train.json")
    assert paths["retrieval_ann"] == "/x/coco.json"  # explicit path wins
    assert paths["tokenizer"] == str(tmp_path / "tokenizer")
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert config_from_json(tmp_path / "config.json") == cfg


def test_cell_names_are_single_safe_components():
    assert cell_name("adamw", "clip", 0) == "adamw-clip-s0"
    for nasty in ("../../etc", "a/b", ".hidden", "x\\y", "a b"):
        name = safe_name(nasty)
        assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")
    assert make_config("demo", label="adam-nol2").cell_name() == "adam-nol2-clip-s0"
    assert RunConfig().cell_name() == "adamw-clip-s0"
