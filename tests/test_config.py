"""Configuration: profiles, overrides by name, validation naming the field."""

import json

import pytest

from clipstudy.engine.config import ConfigError, RunConfig, cell_name, config_from_json, make_config, safe_name
from clipstudy.engine.preflight import check_components


def test_profiles_and_overrides():
    paper = make_config("paper")
    # docs/protocol.md's paper setting
    assert (paper.batch_size, paper.epochs, paper.image_size, paper.temperature) == (128, 30, 256, 0.01)
    assert (paper.weight_decay, paper.warmup_lr, paper.min_lr, paper.max_length) == (0.02, 1e-5, 1e-6, 30)
    assert paper.image_encoder == "resnet50" and paper.text_encoder == "distilbert"
    demo = make_config("demo", epochs="4", lr="1e-3", hflip="false", loss="sogclr", loss_params='{"gamma": 0.9}')
    assert demo.epochs == 4 and demo.lr == 1e-3 and demo.hflip is False and demo.loss_params == {"gamma": 0.9}
    assert make_config("demo", **{"batch-size": 64}).batch_size == 64


@pytest.mark.parametrize(
    "field, value, words",
    [
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
    ],
)
def test_invalid_values_name_the_field(field, value, words):
    with pytest.raises(ConfigError) as err:
        check_components(make_config("demo", **{field: value}))
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "fields, words",
    [
        # issue 15 case 5 / issue 13 item 4: each failed inside training (a traceback), not when the config was made
        ({"loss": "sogclr", "loss_params": '{"gama": 0.9}'}, ["loss_params", "'gama'", "'gamma'", "'estimator'"]),
        ({"loss": "clip", "loss_params": '{"gamma": 0.9}'}, ["loss_params", "'gamma'", "'clip'"]),
        ({"loss": "sogclr", "loss_params": '{"gamma": 2.0}'}, ["loss_params", "gamma", "(0, 1]"]),
        ({"optimizer": "adamw", "optimizer_params": '{"betas": 0.9}'}, ["optimizer_params", "'betas'=0.9", "adamw"]),
        (
            {"optimizer": "sgd", "optimizer_params": '{"momentun": 0.5}'},
            ["optimizer_params", "'momentun'", "'momentum'"],
        ),
        ({"optimizer": "adam", "optimizer_params": '{"eps": -1}'}, ["optimizer_params", "'eps'=-1"]),
    ],
)
def test_loss_and_optimizer_params_are_checked_by_the_components_at_start_up(fields, words):
    config = make_config("demo", **fields)  # the configuration's own fields are fine
    with pytest.raises(ConfigError) as err:
        check_components(config)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    ok = make_config(
        "demo", loss="sogclr", loss_params={"gamma": 0.5}, optimizer="adamw", optimizer_params={"betas": [0.9, 0.98]}
    )
    check_components(ok)
    assert ok.loss_params == {"gamma": 0.5} and ok.optimizer_params == {"betas": [0.9, 0.98]}


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


def test_paper_profile_runs_what_the_original_code_ran():
    paper = make_config("paper")
    assert (paper.augment, paper.zeroshot_transform, paper.image_weights, paper.amp) == (
        "albef",
        "original",
        "timm-a1",
        "fp16",
    )
    # per-loss parameters of the code base, merged for the run's loss only; an explicit value wins
    assert make_config("paper", loss="sogclr").loss_params == {"estimator": "original"}
    assert make_config("paper", loss="onlineclr").loss_params == {"gamma": 0.8}
    assert make_config("paper", loss="clip").loss_params == {}
    assert make_config("paper", loss="onlineclr", loss_params={"gamma": 0.5}).loss_params == {"gamma": 0.5}
    exact = make_config("paper", loss="sogclr", loss_params='{"estimator": "exact"}')
    assert exact.loss_params == {"estimator": "exact"}
    # the corrections are named options
    corrected = make_config("paper", augment="torchvision", zeroshot_transform="clip", image_weights="torchvision")
    assert (corrected.augment, corrected.zeroshot_transform, corrected.image_weights) == (
        "torchvision",
        "clip",
        "torchvision",
    )


def test_demo_profile_keeps_its_setting():
    demo = make_config("demo")
    assert (demo.augment, demo.zeroshot_transform) == ("none", "clip")
    assert make_config("demo", loss="onlineclr").loss_params == {}
    assert make_config("demo", loss="sogclr").loss_params == {}


def test_demo_transforms_are_the_former_ones():
    import numpy as np
    import torch
    from PIL import Image

    from clipstudy.data.datasets import eval_transform, train_transform, transforms_for

    demo = make_config("demo")
    new = transforms_for(demo)
    former_train = train_transform(32, crop_scale=(0.85, 1.0), hflip=False, randaugment=None)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for seed in range(3):
        torch.manual_seed(seed)
        a = new["train"](image)
        torch.manual_seed(seed)
        assert torch.equal(a, former_train(image))
    assert torch.equal(new["zeroshot"](image), eval_transform(32)(image))
    assert torch.equal(new["retrieval"](image), eval_transform(32)(image))


def test_legacy_randaugment_field_is_migrated(tmp_path):
    assert make_config("demo", randaugment=True).augment == "torchvision"
    assert make_config("paper", randaugment="false").augment == "none"
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"profile": "demo", "randaugment": True, "epochs": 2}))
    assert config_from_json(old).augment == "torchvision"
    with pytest.raises(ConfigError, match="randaugment"):
        make_config("demo", randaugment="maybe")


@pytest.mark.parametrize(
    "field, value",
    [("augment", "autoaugment"), ("zeroshot_transform", "imagenet"), ("image_weights", "resnet50.a2_in1k")],
)
def test_new_choices_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        make_config("paper", **{field: value})


def test_the_smoke_profile_is_a_few_dozen_steps_on_the_demo_set():
    """Seconds from the notebook as from the tests: on a demo set of the default size (4000 pairs) the smoke
    profile trains on its first pairs only (timed from the notebook in test_notebooks.py)."""
    from clipstudy.data.demo import DEFAULTS

    config = make_config("smoke")
    pairs = min(config.limit_train or DEFAULTS["train_size"], DEFAULTS["train_size"])
    assert pairs // config.batch_size * config.epochs <= 40
