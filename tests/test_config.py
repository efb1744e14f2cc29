"""Configuration: profiles, overrides by name, validation naming the field."""

import json
from pathlib import Path

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
        ("hflip", "maybe", ["'hflip'", "'maybe'", "bool"]),  # a bool field names itself too
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


# ----------------------------------------------------------------------------------------------------------------
# validate: every check, its bad value (the message names the field and the accepted values) and its good boundary.
# The base is RunConfig() (the paper's towers: no tokenizer folder needed); each case changes one field.
def _checked(**changes):
    import dataclasses

    from clipstudy.engine.config import validate

    config = dataclasses.replace(RunConfig(), **changes)
    assert validate(config) is config
    return config


def _refused(**changes) -> str:
    with pytest.raises(ConfigError) as err:
        _checked(**changes)
    return str(err.value)


AT_LEAST_ONE = (
    "epochs",
    "batch_size",
    "image_size",
    "embed_dim",
    "max_length",
    "max_words",
    "eval_batch_size",
    "text_dim",
    "text_layers",
    "keep_checkpoints",
    "log_every",
    "eval_every",
)
AT_LEAST_ZERO = ("num_workers", "limit_train", "max_steps", "threads", "seed")
RATES = ("lr", "weight_decay", "warmup_lr", "min_lr", "grad_clip")


def test_the_defaults_and_the_boundary_values_pass_validation():
    _checked()
    _checked(**{name: 1 for name in AT_LEAST_ONE})  # ">= 1": 1 itself is allowed
    _checked(**{name: 0 for name in AT_LEAST_ZERO})  # ">= 0": 0 itself is allowed
    _checked(**{name: 0.0 for name in RATES})
    _checked(warmup_steps=-1)  # one epoch of warm-up
    _checked(warmup_steps=0)
    for value in (1e-12, 0.5, 1.5, 100.0):  # any positive temperature
        _checked(temperature=value)
    for value in (1e-6, 0.5, 1.0):  # the crop scale is in (0, 1]: 1 included
        _checked(crop_scale_min=value)
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3"):
        _checked(device=device)
    _checked(small_resnet_widths=[8], small_resnet_blocks=[2])
    _checked(small_resnet_widths=[8, 16, 32, 64], small_resnet_blocks=[1, 2, 2, 1])
    for label in ("", "adam-nol2", "a.b_c+d=e"):
        _checked(label=label)
    for profile in ("paper", "demo", "smoke"):
        _checked(profile=profile)
    # small_distilbert needs a tokenizer folder: explicit, or the data folder's
    _checked(text_encoder="small_distilbert", tokenizer="/somewhere/tokenizer")
    _checked(text_encoder="small_distilbert", data="/somewhere/data")


@pytest.mark.parametrize("name", AT_LEAST_ONE)
def test_a_count_below_one_is_refused_naming_the_field(name):
    assert _refused(**{name: 0}) == f"config field '{name}'=0: must be >= 1"
    assert _refused(**{name: -3}) == f"config field '{name}'=-3: must be >= 1"


@pytest.mark.parametrize("name", AT_LEAST_ZERO)
def test_a_negative_count_is_refused_naming_the_field(name):
    assert _refused(**{name: -1}) == f"config field '{name}'=-1: must be >= 0"


@pytest.mark.parametrize("name", RATES)
def test_a_negative_rate_or_decay_is_refused_naming_the_field(name):
    expected = f"config field '{name}'=-1e-09: must be >= 0 (a learning rate or decay cannot be negative)"
    assert _refused(**{name: -1e-9}) == expected


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("temperature", 0.0, "config field 'temperature'=0.0: must be > 0"),
        ("temperature", -0.5, "config field 'temperature'=-0.5: must be > 0"),
        ("crop_scale_min", 0.0, "config field 'crop_scale_min'=0.0: must be in (0, 1]"),
        ("crop_scale_min", -0.5, "config field 'crop_scale_min'=-0.5: must be in (0, 1]"),
        ("crop_scale_min", 1.0001, "config field 'crop_scale_min'=1.0001: must be in (0, 1]"),
        ("crop_scale_min", 1.5, "config field 'crop_scale_min'=1.5: must be in (0, 1]"),
        ("warmup_steps", -2, "config field 'warmup_steps'=-2: must be -1 (one epoch) or >= 0"),
        ("device", "gpu", "config field 'device'='gpu': choose auto, cpu, cuda or cuda:N"),
        ("device", "CPU", "config field 'device'='CPU': choose auto, cpu, cuda or cuda:N"),
        ("device", "cuda1", "config field 'device'='cuda1': choose auto, cpu, cuda or cuda:N"),
        ("device", "", "config field 'device'='': choose auto, cpu, cuda or cuda:N"),
        ("label", "a/b", "config field 'label'='a/b': use letters, digits and . _ + = - only"),
        ("label", ".hidden", "config field 'label'='.hidden': use letters, digits and . _ + = - only"),
        ("profile", "huge", "config field 'profile'='huge': choose one of ['demo', 'paper', 'smoke']"),
    ],
)
def test_each_bounded_field_refuses_a_value_out_of_its_range(name, value, message):
    assert _refused(**{name: value}) == message


def test_the_small_resnet_needs_one_block_count_per_width():
    expected = "config field 'small_resnet_blocks'={}: needs one entry per entry of small_resnet_widths"
    assert _refused(small_resnet_widths=[8, 16], small_resnet_blocks=[1, 1, 1]) == expected.format("[1, 1, 1]")
    assert _refused(small_resnet_widths=[8, 16, 32], small_resnet_blocks=[1]) == expected.format("[1]")
    assert _refused(small_resnet_widths=[], small_resnet_blocks=[]) == expected.format("[]")  # no stage at all


def test_the_small_text_tower_needs_a_tokenizer_folder():
    assert _refused(text_encoder="small_distilbert") == (
        "config field 'tokenizer'='': small_distilbert needs the data set's tokenizer folder (set `data` or "
        "`tokenizer`)"
    )
    _checked(text_encoder="distilbert")  # the Hugging Face tower brings its own


@pytest.mark.parametrize(
    "name, choices",
    [
        ("image_encoder", ["resnet50", "small_resnet"]),
        ("text_encoder", ["distilbert", "small_distilbert"]),
        ("amp", ["auto", "bf16", "fp16", "none"]),
        ("small_resnet_norm", ["batch", "group"]),
        ("augment", ["albef", "torchvision", "none"]),
        ("zeroshot_transform", ["original", "clip"]),
        ("image_weights", ["timm-a1", "torchvision"]),
        ("lr_schedule", ["smooth", "original"]),
        ("text_pooling", ["first", "mean"]),
    ],
)
def test_each_choice_field_takes_its_choices_and_nothing_else(name, choices):
    for choice in choices:
        _checked(**{name: choice, "tokenizer": "/somewhere/tokenizer"})
    assert _refused(**{name: "other"}) == f"config field '{name}'='other': choose one of {choices}"
    assert _refused(**{name: choices[0].upper()}).startswith(f"config field '{name}'=")


# ----------------------------------------------------------------------------------------------------------------
# _coerce and _coerce_bool: command-line strings to the field's type, or a message naming the field.
@pytest.mark.parametrize(
    "value, expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("1", True),
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("yes", True),
        ("Yes", True),
        ("on", True),
        ("ON", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("NO", False),
        ("off", False),
        ("Off", False),
    ],
)
def test_bool_fields_accept_the_usual_spellings(value, expected):
    from clipstudy.engine.config import _coerce_bool

    assert _coerce_bool("hflip", value) is expected
    assert make_config("demo", hflip=value).hflip is expected


@pytest.mark.parametrize("value", [2, -1, "2", "maybe", "", "y", None, 1.0, [1]])
def test_bool_fields_refuse_anything_else_naming_the_field(value):
    from clipstudy.engine.config import _coerce_bool

    with pytest.raises(ConfigError) as err:
        _coerce_bool("hflip", value)
    assert str(err.value) == f"config field 'hflip': {value!r} is not a valid bool"
    with pytest.raises(ConfigError) as err:
        make_config("demo", cache_images=value)
    assert str(err.value) == f"config field 'cache_images': {value!r} is not a valid bool"


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("epochs", "3", 3),
        ("epochs", 2.0, 2),
        ("epochs", 7, 7),
        ("seed", "-1", -1),  # coerced here, refused by validate
        ("lr", "1e-3", 0.001),
        ("lr", 2, 2.0),
        ("lr", "0", 0.0),
        ("label", None, ""),
        ("label", "x", "x"),
        ("out", Path("a") / "b", "a/b"),
        ("small_resnet_widths", "[8, 16]", [8, 16]),
        ("small_resnet_widths", [4, 8], [4, 8]),
        ("loss_params", '{"gamma": 0.5}', {"gamma": 0.5}),
        ("loss_params", {"gamma": 0.25}, {"gamma": 0.25}),
        ("pretrain", "{}", {}),
        ("hflip", "off", False),
    ],
)
def test_values_are_coerced_to_the_fields_type(name, value, expected):
    from clipstudy.engine.config import _coerce

    out = _coerce(name, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "name, value, kind",
    [
        ("epochs", 2.5, "int"),
        ("epochs", True, "int"),
        ("epochs", "many", "int"),
        ("epochs", None, "int"),
        ("lr", True, "float"),
        ("lr", "fast", "float"),
        ("lr", float("inf"), "float"),
        ("lr", float("-inf"), "float"),
        ("lr", float("nan"), "float"),
        ("lr", "nan", "float"),
        ("label", 3, "str"),
        ("label", ["a"], "str"),
        ("small_resnet_widths", '{"a": 1}', "list"),
        ("small_resnet_widths", "[8, 16", "list"),
        ("small_resnet_widths", 8, "list"),
        ("loss_params", "[1]", "dict"),
        ("loss_params", "gamma=0.5", "dict"),
        ("loss_params", None, "dict"),
        ("hflip", "maybe", "bool"),
    ],
)
def test_ill_typed_values_are_refused_naming_the_field_and_its_type(name, value, kind):
    from clipstudy.engine.config import _coerce

    with pytest.raises(ConfigError) as err:
        _coerce(name, value)
    assert str(err.value) == f"config field {name!r}: {value!r} is not a valid {kind}"


def test_int_fields_keep_whole_floats_as_ints():
    config = make_config("demo", epochs=4.0, batch_size="8")
    assert (config.epochs, config.batch_size) == (4, 8) and type(config.epochs) is int


# ----------------------------------------------------------------------------------------------------------------
# make_config, _absolute_path, config_from_dict
def test_make_config_defaults_to_the_demo_profile():
    assert make_config() == make_config("demo") and make_config().profile == "demo"


def test_an_unknown_profile_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as err:
        make_config("huge", epochs=2)
    assert str(err.value) == "config field 'profile'='huge': choose one of ['demo', 'paper', 'smoke']"


def test_an_unknown_field_is_refused_with_the_close_names():
    from clipstudy.engine.config import FIELDS

    valid = f"valid fields: {sorted(FIELDS)}"
    with pytest.raises(ConfigError) as err:
        make_config("demo", epoch=3)  # a part of 'epochs'
    assert str(err.value) == f"unknown config field 'epoch' (did you mean ['epochs']?); {valid}"
    with pytest.raises(ConfigError) as err:
        make_config("demo", seeds=3)  # holds 'seed'
    assert str(err.value) == f"unknown config field 'seeds' (did you mean ['seed']?); {valid}"
    with pytest.raises(ConfigError) as err:
        make_config("demo", zzz=3)  # close to nothing: no hint
    assert str(err.value) == f"unknown config field 'zzz'; {valid}"


def test_a_legacy_field_is_migrated_and_the_fields_after_it_still_apply():
    config = make_config("demo", randaugment="yes", epochs=5, lr="0.5")
    assert (config.augment, config.epochs, config.lr) == ("torchvision", 5, 0.5)
    assert make_config("demo", **{"batch-size": 3, "eval-every": 2}).eval_every == 2


def test_relative_paths_from_a_profile_are_under_the_project_and_given_ones_under_the_current_folder(
    tmp_path, monkeypatch
):
    root, cwd = tmp_path / "project", tmp_path / "shell"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("CLIPSTUDY_ROOT", str(root))
    monkeypatch.chdir(cwd)
    assert make_config("demo").data == str(root / "data" / "demo")  # the profile's "data/demo"
    given = make_config("demo", data="mine", out="runs/../runs/a", train_ann="ann/train.json")
    assert (given.data, given.out, given.train_ann) == (
        str(cwd / "mine"),
        str(cwd / "runs" / "a"),
        str(cwd / "ann" / "train.json"),
    )
    absolute = make_config("demo", data="/x/y/../z", retrieval_ann="/a//b.json")
    assert (absolute.data, absolute.retrieval_ann) == ("/x/z", "/a/b.json")
    assert make_config("paper").data == "" and make_config("paper").out == ""  # empty stays empty


def test_a_profile_path_without_a_project_folder_fails_naming_the_field(tmp_path, monkeypatch):
    from clipstudy import paths
    from clipstudy.engine.config import _absolute_path

    def no_root():
        raise paths.ProjectRootNotFound("no project folder here")

    monkeypatch.setattr(paths, "project_root", no_root)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        make_config("demo")
    assert str(err.value) == (
        "config field 'data'='data/demo' (profile default) is relative to the project folder: no project folder here"
    )
    # an absolute path, or one given by the caller, needs no project folder
    assert make_config("demo", data="/d").data == "/d"
    assert make_config("demo", data="d").data == str(tmp_path / "d")
    assert _absolute_path("data", "/abs/../x", from_profile=True) == "/x"
    assert _absolute_path("data", "", from_profile=True) == ""
    assert _absolute_path("out", "rel", from_profile=False) == str(tmp_path / "rel")


def test_config_from_dict_takes_the_known_fields_and_defaults_to_demo():
    from clipstudy.engine.config import config_from_dict

    assert config_from_dict({"epochs": 2}) == make_config("demo", epochs=2)
    recorded = {"profile": "smoke", "epochs": 5, "retired_field": 1, "fingerprint": {"digest": "x"}}
    assert config_from_dict(recorded) == make_config("smoke", epochs=5)  # fields of no version are ignored
    assert config_from_dict({"profile": "paper", "randaugment": False}).augment == "none"
    assert config_from_dict(make_config("smoke", seed=4).to_dict()) == make_config("smoke", seed=4)
