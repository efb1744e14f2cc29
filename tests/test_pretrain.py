"""The demo's pretrained towers: disjoint from the study's data, deterministic, cached, race-free."""

import hashlib
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from clipstudy.data.datasets import clean_caption
from clipstudy.engine import pretrain
from clipstudy.engine.config import ConfigError, make_config

TINY = dict(images=48, image_epochs=1, image_batch_size=16, captions=96, text_epochs=1, text_batch_size=16)


@pytest.fixture
def data_dir(demo_data_dir, tmp_path):
    """A private copy of the tiny demo set (pretraining writes its cache into the data folder)."""
    return shutil.copytree(demo_data_dir, tmp_path / "demo")


def smoke(data_dir, **overrides):
    return make_config("smoke", **{"data": str(data_dir), "pretrained": True, "pretrain": dict(TINY), **overrides})


def pixel_digest(path):
    # an independent hash of the decoded pixels, written here rather than imported
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def test_zeroshot_classes_never_reach_pretraining(data_dir):
    """No pretraining image, label or caption shows a zero-shot class (a held-out colour x shape combination)."""
    from clipstudy.data.demo_scenes import COLOURS, SHAPES

    config = smoke(data_dir)
    classes = json.loads((data_dir / "zeroshot" / "classnames.json").read_text())["classnames"]
    held = {tuple(class_id.split("_")) for class_id in classes}
    images, labels, image_scenes = pretrain.pretraining_images(pretrain.PretrainSettings(images=600), 32)
    assert len(images) == len(labels) == len(image_scenes) == 600
    # the labels, decoded independently from the heads' order (colour, shape, ...)
    named = {(list(COLOURS)[row[0]], list(SHAPES)[row[1]]) for row in labels}
    assert not named & held and len(named) > len(held)  # many seen classes, none held out
    captions, _, caption_scenes = pretrain.pretraining_captions(pretrain.PretrainSettings(captions=3000), set())
    for colour, shape in held:
        for colour_word in COLOURS[colour][1]:
            for shape_word in SHAPES[shape]:
                assert not any(f"{colour_word} {shape_word}" in caption for caption in captions)
    counts = pretrain.check_disjoint(pretrain.zeroshot_scenes(config), image_scenes + caption_scenes)
    assert counts == {"combination": 0, "configuration": 0}


def test_the_disjointness_check_fails_on_a_planted_overlap(data_dir):
    config = smoke(data_dir)
    zeroshot = pretrain.zeroshot_scenes(config)
    scenes = json.loads((data_dir / "scenes.json").read_text())
    assert len(zeroshot) == len(scenes["zeroshot"]) + len(scenes["val_zeroshot"]) > 0
    _, _, seen = pretrain.pretraining_images(pretrain.PretrainSettings(images=50), 32)
    planted = dict(
        seen[0], shapes=[dict(seen[0]["shapes"][0], **{k: zeroshot[5]["shapes"][0][k] for k in ("colour", "shape")})]
    )
    planted_class = (zeroshot[5]["shapes"][0]["colour"], zeroshot[5]["shapes"][0]["shape"])
    n = sum((s["shapes"][0]["colour"], s["shapes"][0]["shape"]) == planted_class for s in zeroshot)
    assert n == 2 * 3  # that class's images in the validation and the test split (3 each in the tiny set)
    with pytest.raises(ConfigError, match=f"would show {n} zero-shot scene"):
        pretrain.check_disjoint(zeroshot, seen + [planted])
    assert pretrain.check_disjoint(None, seen) is None  # a data set without scene records: nothing to count


def test_pretraining_captions_are_disjoint_from_the_study_captions(data_dir):
    config = smoke(data_dir)
    train = [e["caption"] for e in json.loads((data_dir / "train.json").read_text())]
    retrieval = [
        c
        for name in ("retrieval.json", "val_retrieval.json")
        for e in json.loads((data_dir / name).read_text())
        for c in e["caption"]
    ]
    spec = json.loads((data_dir / "zeroshot" / "classnames.json").read_text())
    prompts = [t.format(n) for n in spec["classnames"].values() for t in spec["templates"]]
    study = {clean_caption(t) for t in train + retrieval + prompts}
    assert pretrain.study_captions(config) == study
    settings = pretrain.settings_from(config)
    # a large corpus, so that some generated captions do coincide with study ones and get dropped
    big = pretrain.PretrainSettings(captions=3000)
    captions, dropped, _ = pretrain.pretraining_captions(big, study)
    assert len(captions) == 3000 and dropped > 0 and not set(captions) & study
    unfiltered, none_dropped, _ = pretrain.pretraining_captions(big, set())
    assert none_dropped == 0 and set(unfiltered) & study  # without the filter they would overlap
    assert pretrain.pretraining_captions(settings, study)[0] == pretrain.pretraining_captions(settings, study)[0]


def test_pretraining_is_deterministic(data_dir):
    config = smoke(data_dir)
    settings = pretrain.settings_from(config)
    first, meta = pretrain.build_towers(config, settings, progress=False)
    second, _ = pretrain.build_towers(config, settings, progress=False)
    for part in ("image_tower", "text_tower"):
        assert first[part].keys() == second[part].keys()
        for name in first[part]:
            assert torch.equal(first[part][name], second[part][name]), (part, name)
    assert meta["images"] == TINY["images"] and meta["captions"] == TINY["captions"]


def test_cache_is_reused_keyed_by_content_and_leaves_the_run_rng_alone(data_dir, monkeypatch):
    config = smoke(data_dir)
    before = torch.get_rng_state()
    path, meta = pretrain.ensure_pretrained(config, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"]
    monkeypatch.setattr(pretrain, "build_towers", lambda *a, **k: pytest.fail("rebuilt a cached entry"))
    assert pretrain.ensure_pretrained(config, progress=False)[0] == path
    digest = json.loads((data_dir / "manifest.json").read_text())["digest"]
    settings = pretrain.settings_from(config)
    key = pretrain.cache_key(config, settings, digest)
    assert path.parent.name == key
    assert pretrain.cache_key(config, pretrain.PretrainSettings(**{**TINY, "seed": 1}), digest) != key
    assert pretrain.cache_key(config, settings, "0" * 64) != key
    assert pretrain.cache_key(smoke(data_dir, text_dim=16), settings, digest) != key
    # a damaged file is not reused
    path.write_bytes(b"damaged")
    with pytest.raises(pytest.fail.Exception):
        pretrain.ensure_pretrained(config, progress=False)


def test_concurrent_runs_build_once(data_dir, monkeypatch):
    config = smoke(data_dir)
    calls, real = [], pretrain.build_towers

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "build_towers", counted)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(pretrain.ensure_pretrained(config, progress=False)[0]))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


def test_runs_load_the_towers_and_scratch_does_not(data_dir):
    from clipstudy.engine.build import build_model_for
    from clipstudy.engine.runstate import seed_everything

    config = smoke(data_dir)
    seed_everything(0)
    model, _ = build_model_for(config)
    assert pretrain.load_pretrained_towers(model, config, progress=False) is not None
    path, _ = pretrain.ensure_pretrained(config, progress=False)
    state = torch.load(path, weights_only=True)
    for name, value in model.image_tower.state_dict().items():
        assert torch.equal(value, state["image_tower"][name])
    for name, value in model.text_tower.transformer.state_dict().items():
        assert torch.equal(value, state["text_tower"][name])
    scratch = smoke(data_dir, pretrained=False)
    assert pretrain.load_pretrained_towers(model, scratch, progress=False) is None


def test_bad_settings_and_foreign_data_fail_clearly(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="'pretrain'.*unknown key.*imgs"):
        pretrain.settings_from(make_config("smoke", data=str(data_dir), pretrain={"imgs": 3}))
    foreign = shutil.copytree(data_dir, tmp_path / "foreign")
    (foreign / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="make-demo-data.*pretrained=false"):
        pretrain.ensure_pretrained(smoke(foreign), progress=False)


def test_a_pretrained_run_logs_collapse_diagnostics(data_dir, tmp_path):
    import pandas as pd

    from clipstudy.engine.train import train

    metrics = train(smoke(data_dir, out=str(tmp_path / "run"), epochs=1), progress=False)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    for name in ("image_cos_mean", "text_cos_mean", "image_std_mean", "text_std_mean", "weight_norm"):
        assert history[name].notna().all(), name
        assert metrics[f"{name}_start"] == pytest.approx(history[name].iloc[0])
        assert metrics[f"{name}_end"] == pytest.approx(history[name].iloc[-1])
    assert ((history["text_cos_mean"] > -1) & (history["text_cos_mean"] < 1)).all()


def test_loading_the_towers_reads_the_file_once(data_dir, monkeypatch):
    # the digest check and the load use the same bytes: no second read, nothing can change in between
    from pathlib import Path

    from clipstudy.engine.build import build_model_for

    config = smoke(data_dir)
    pretrain.ensure_pretrained(config, progress=False)
    reads = []
    real_read_bytes, real_load = Path.read_bytes, torch.load

    def counting_read_bytes(self):
        reads.append(self.name)
        return real_read_bytes(self)

    def load_from_memory_only(source, **kwargs):
        assert not isinstance(source, (str, Path)), f"torch.load read {source} again"
        return real_load(source, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", counting_read_bytes)
    monkeypatch.setattr(torch, "load", load_from_memory_only)
    model, _ = build_model_for(config)
    assert pretrain.load_pretrained_towers(model, config, progress=False) is not None
    assert reads.count("towers.pt") == 1


def test_ctrl_c_while_pretraining_says_it_starts_again_from_step_0(data_dir, tmp_path, monkeypatch, capsys):
    """Pretraining keeps no checkpoint: an interruption says what it costs (not just "interrupted")."""
    from clipstudy.__main__ import main

    def interrupted(*args, **kwargs):  # Ctrl-C once the image tower is trained, during the text tower's
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "train_text_tower", interrupted)
    argv = ["train", "--profile", "smoke", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--no-progress"]
    code = main([*argv, "--threads", "1", "--pretrained", "true", "--pretrain", json.dumps(TINY)])
    stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped:")]
    assert code == 130 and len(stopped) == 1
    assert "while pretraining the demo towers" in stopped[0] and "again from step 0" in stopped[0]
    assert not list((data_dir / "pretrained").glob("*/towers.pt"))  # nothing half-made was cached


def test_the_towers_do_not_depend_on_the_callers_thread_count(data_dir):
    """Pretraining runs on its own fixed thread count (settings.threads): a sweep's one-thread cell and a
    notebook on every core build the same towers, and the caller's thread count comes back."""
    config = smoke(data_dir)
    settings = pretrain.settings_from(config)
    built = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state, meta = pretrain.build_towers(config, settings, progress=False)
            assert torch.get_num_threads() == threads and meta["torch_threads"] == settings.threads
            built[threads] = state
    finally:
        torch.set_num_threads(before)
    for part in ("image_tower", "text_tower"):
        for name, tensor in built[1][part].items():
            assert torch.equal(tensor, built[2][part][name]), (part, name)


# ------------------------------------------------------------------- the pure parts, against values worked out here
def namespace(**fields):
    from types import SimpleNamespace

    return SimpleNamespace(**fields)


SETTING_NAMES = [
    "captions",
    "image_batch_size",
    "image_epochs",
    "image_lr",
    "images",
    "mlm_probability",
    "seed",
    "text_batch_size",
    "text_epochs",
    "text_lr",
    "threads",
    "weight_decay",
]


def test_settings_come_from_the_pretrain_field_coerced_to_each_settings_type():
    assert pretrain.settings_from(namespace(pretrain={})) == pretrain.PretrainSettings()
    settings = pretrain.settings_from(namespace(pretrain={"images": "48", "image_lr": "0.01", "seed": 3.0}))
    assert (settings.images, settings.image_lr, settings.seed) == (48, 0.01, 3)
    assert (type(settings.images), type(settings.image_lr), type(settings.seed)) == (int, float, int)
    assert settings.captions == 12000 and settings.threads == 2  # the others keep their defaults
    with pytest.raises(ConfigError) as err:
        pretrain.settings_from(namespace(pretrain={"images": 3, "zz": 1, "imgs": 2}))
    assert str(err.value) == f"config field 'pretrain': unknown key(s) ['imgs', 'zz']; valid keys: {SETTING_NAMES}"
    with pytest.raises(ConfigError) as err:
        pretrain.settings_from(namespace(pretrain={"images": "many"}))
    assert str(err.value).startswith("config field 'pretrain'={'images': 'many'}: invalid literal for int()")


def test_zeroshot_scenes_are_the_test_then_the_validation_scenes(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenes.json").write_text(json.dumps({"zeroshot": [{"in": "cwd"}]}))
    assert pretrain.zeroshot_scenes(namespace(data="")) is None  # no data folder: no scene records (not the cwd's)
    assert pretrain.zeroshot_scenes(namespace(data=str(folder))) is None  # no scenes.json
    (folder / "scenes.json").write_text("{broken")
    assert pretrain.zeroshot_scenes(namespace(data=str(folder))) is None
    scenes = {"train": [{"t": 1}], "zeroshot": [{"z": 1}, {"z": 2}], "val_zeroshot": [{"v": 1}], "retrieval": [{}]}
    (folder / "scenes.json").write_text(json.dumps(scenes))
    assert pretrain.zeroshot_scenes(namespace(data=str(folder))) == [{"z": 1}, {"z": 2}, {"v": 1}]
    (folder / "scenes.json").write_text(json.dumps({"val_zeroshot": [{"v": 1}]}))  # a split may be absent
    assert pretrain.zeroshot_scenes(namespace(data=str(folder))) == [{"v": 1}]
    (folder / "scenes.json").write_text(json.dumps({"zeroshot": [{"z": 1}]}))
    assert pretrain.zeroshot_scenes(namespace(data=str(folder))) == [{"z": 1}]


def scene(colour, shape, size="small", row=0, col=0, tone="dark"):
    return {
        "shapes": [{"colour": colour, "shape": shape, "size": size, "row": row, "col": col}],
        "background": {"tone": tone},
    }


def test_the_disjointness_check_counts_shared_classes_and_refuses_any():
    evaluation = [scene("red", "circle"), scene("red", "circle", "large", 2, 2, "light"), scene("blue", "cross")]
    assert pretrain.check_disjoint(None, [scene("red", "circle")]) is None
    assert pretrain.check_disjoint([], [scene("red", "circle")]) == {"combination": 0, "configuration": 0}
    seen = [scene("red", "square"), scene("green", "circle"), scene("blue", "diamond")]  # colours, shapes: not pairs
    assert pretrain.check_disjoint(evaluation, seen) == {"combination": 0, "configuration": 0}
    message = (
        "pretraining data would show {} zero-shot scene(s)' colour x shape class to the towers before evaluation; "
        "the demo generator's held-out classes (demo_scenes.HELD_OUT) must not reach pretraining: regenerate the "
        "data set with this version (make demo-data)"
    )
    with pytest.raises(ConfigError) as err:  # another size, cell and tone: still the red circle class
        pretrain.check_disjoint(evaluation, [*seen, scene("red", "circle", "large", 1, 1, "light")])
    assert str(err.value) == message.format(2)
    with pytest.raises(ConfigError) as err:
        pretrain.check_disjoint(evaluation, [scene("blue", "cross", "large")])
    assert str(err.value) == message.format(1)


def test_study_captions_are_every_caption_and_prompt_as_the_study_cleans_them(tmp_path, monkeypatch):
    files = {
        "train.json": [{"image": "a.png", "caption": "A Red, Circle!"}, {"image": "b.png", "caption": "don't stop"}],
        "retrieval.json": [{"image": "c.png", "caption": ["Blue square", "a b c d e f"]}],
        "val_retrieval.json": [{"image": "d.png", "caption": ["Green cross"]}],
        "zeroshot/classnames.json": {
            "classnames": {"red_circle": "red circle", "purple_diamond": "Purple Diamond"},
            "templates": ["a photo of a {}.", "{}"],
        },
        "val_zeroshot/classnames.json": {"classnames": {"blue_cross": "blue cross"}, "templates": ["itap of a {}"]},
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    config = make_config(
        "paper",
        train_ann=str(tmp_path / "train.json"),
        retrieval_ann=str(tmp_path / "retrieval.json"),
        val_retrieval_ann=str(tmp_path / "val_retrieval.json"),
        zeroshot_images=str(tmp_path / "zeroshot"),
        val_zeroshot_images=str(tmp_path / "val_zeroshot"),
        max_words=4,
    )
    assert pretrain.study_captions(config) == {
        "a red circle",
        "dont stop",
        "blue square",
        "a b c d",  # at most max_words words
        "green cross",
        "a photo of a",
        "red circle",
        "purple diamond",
        "itap of a blue",
    }
    # only the training captions; an annotation file or class-name file that is named but absent is skipped
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "classnames.json").write_text(json.dumps(files["zeroshot/classnames.json"]))
    monkeypatch.chdir(tmp_path / "elsewhere")  # a classnames.json in the current folder is not the data set's
    alone = make_config("paper", train_ann=str(tmp_path / "train.json"), retrieval_ann=str(tmp_path / "absent.json"))
    assert pretrain.study_captions(alone) == {"a red circle", "dont stop"}
    empty_folder = make_config("paper", train_ann=str(tmp_path / "train.json"), zeroshot_images=str(tmp_path))
    assert pretrain.study_captions(empty_folder) == {"a red circle", "dont stop"}


def test_scene_labels_are_the_index_of_each_attribute():
    # COLOURS: red orange yellow green cyan blue purple; SHAPES: circle square triangle cross diamond;
    # SIZES: small large; TONES: dark light; row and column of the 3 x 3 grid
    assert pretrain.scene_labels(scene("red", "circle", "small", 0, 2, "dark")) == [0, 0, 0, 0, 2, 0]
    assert pretrain.scene_labels(scene("orange", "triangle", "large", 2, 1, "light")) == [1, 2, 1, 2, 1, 1]
    assert pretrain.scene_labels(scene("purple", "diamond", "large", 1, 0, "light")) == [6, 4, 1, 1, 0, 1]
    pair = scene("cyan", "cross", "small", 1, 1, "dark")
    pair["shapes"].append(scene("yellow", "square", "large", 2, 2)["shapes"][0])
    assert pretrain.scene_labels(pair) == [4, 3, 0, 1, 1, 0]  # the first shape's


def tower_config(**changes):
    fields = dict(
        image_size=32,
        small_resnet_widths=[8, 16, 32],
        small_resnet_blocks=[1, 1, 1],
        small_resnet_norm="batch",
        text_dim=32,
        text_layers=1,
        max_length=16,
        max_words=30,
    )
    return namespace(**{**fields, **changes})


def test_the_cache_key_is_the_digest_of_its_documented_inputs():
    """The generator and pretraining versions, the settings, the data set's digest and the towers' shapes, as
    canonical JSON (the payload written out here by hand)."""
    settings = pretrain.PretrainSettings(images=48, seed=1)
    payload = {
        "data_digest": "d" * 64,
        "generator_version": 2,
        "image": [32, [8, 16, 32], [1, 1, 1], "batch"],
        "pretrain_version": 2,
        "settings": {
            "captions": 12000,
            "image_batch_size": 64,
            "image_epochs": 10,
            "image_lr": 2e-3,
            "images": 48,
            "mlm_probability": 0.15,
            "seed": 1,
            "text_batch_size": 64,
            "text_epochs": 4,
            "text_lr": 1e-3,
            "threads": 2,
            "weight_decay": 0.01,
        },
        "text": [32, 1, 16, 30],
    }
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    assert pretrain.cache_key(tower_config(), settings, "d" * 64) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 24},  # towers pretrained on 32 px images are not those of 24 px
        {"small_resnet_widths": [8, 16, 64]},
        {"small_resnet_widths": (8, 16, 32, 64)},
        {"small_resnet_blocks": [1, 2, 1]},
        {"small_resnet_norm": "group"},
        {"text_dim": 64},
        {"text_layers": 2},
        {"max_length": 20},
        {"max_words": 12},  # the captions are cut at max_words
    ],
)
def test_each_tower_shape_is_part_of_the_cache_key(change):
    settings, digest = pretrain.PretrainSettings(), "d" * 64
    key = pretrain.cache_key(tower_config(), settings, digest)
    assert pretrain.cache_key(tower_config(**change), settings, digest) != key
    assert len(key) == 20 and int(key, 16) >= 0  # a folder name: 20 hex digits


@pytest.mark.parametrize("name", SETTING_NAMES)
def test_each_pretraining_setting_is_part_of_the_cache_key(name):
    import dataclasses

    settings = pretrain.PretrainSettings()
    changed = dataclasses.replace(settings, **{name: getattr(settings, name) + 1})
    assert pretrain.cache_key(tower_config(), changed, "d") != pretrain.cache_key(tower_config(), settings, "d")


def test_the_data_digest_and_both_versions_are_part_of_the_cache_key(monkeypatch):
    from clipstudy.data import demo

    settings = pretrain.PretrainSettings()
    key = pretrain.cache_key(tower_config(), settings, "a" * 64)
    assert pretrain.cache_key(tower_config(), settings, "a" * 64) == key
    assert pretrain.cache_key(tower_config(), settings, "b" * 64) != key
    # what the run itself does with the towers is not: one cache entry serves every cell
    assert pretrain.cache_key(tower_config(embed_dim=64, lr=0.5, seed=3), settings, "a" * 64) == key
    monkeypatch.setattr(pretrain, "PRETRAIN_VERSION", pretrain.PRETRAIN_VERSION + 1)
    bumped = pretrain.cache_key(tower_config(), settings, "a" * 64)
    assert bumped != key
    monkeypatch.setattr(demo, "GENERATOR_VERSION", demo.GENERATOR_VERSION + 1)
    assert pretrain.cache_key(tower_config(), settings, "a" * 64) not in (key, bumped)


def test_the_data_digest_is_the_manifests_or_a_clear_refusal(tmp_path, monkeypatch):
    expected = (
        "config field 'pretrained'=True with the demo towers needs a data folder made by `python -m clipstudy "
        "make-demo-data` (no readable manifest.json in {}); set `data` to such a folder, or pretrained=false to "
        "start from random weights"
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"generator_version": 2, "digest": "abc123"}))
    assert pretrain._data_digest(namespace(data=str(data))) == "abc123"
    for manifest in ({"generator_version": 2}, {"digest": ""}, {"digest": None}):
        (data / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ConfigError) as err:
            pretrain._data_digest(namespace(data=str(data)))
        assert str(err.value) == expected.format(repr(str(data)))
    (data / "manifest.json").unlink()
    with pytest.raises(ConfigError) as err:
        pretrain._data_digest(namespace(data=str(data)))
    assert str(err.value) == expected.format(repr(str(data)))
    # no data folder: not the current folder's manifest either
    monkeypatch.chdir(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"digest": "cwd"}))
    with pytest.raises(ConfigError) as err:
        pretrain._data_digest(namespace(data=""))
    assert str(err.value) == expected.format("'data'")


def test_a_cache_entry_is_valid_only_when_the_towers_match_the_recorded_digest(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    towers = b"the towers' bytes"
    meta = {"sha256": hashlib.sha256(towers).hexdigest(), "key": "k"}
    assert pretrain._valid(entry) is None  # empty
    (entry / "towers.pt").write_bytes(towers)
    assert pretrain._valid(entry) is None  # no metadata yet (it is written last)
    (entry / "meta.json").write_text(json.dumps(meta))
    assert pretrain._valid(entry) == (meta, towers)
    (entry / "towers.pt").write_bytes(towers + b"!")  # damaged or replaced
    assert pretrain._valid(entry) is None
    (entry / "towers.pt").write_bytes(towers)
    (entry / "meta.json").write_text(json.dumps({"key": "k"}))  # no digest recorded
    assert pretrain._valid(entry) is None
    (entry / "meta.json").write_text("{half written")
    assert pretrain._valid(entry) is None
    (entry / "meta.json").write_text(json.dumps(meta))
    (entry / "towers.pt").unlink()
    assert pretrain._valid(entry) is None
    assert pretrain._valid(tmp_path / "absent") is None


@pytest.mark.parametrize(
    "pretrained, image_encoder, text_encoder, expected",
    [
        (True, "small_resnet", "small_distilbert", (True, True)),
        (True, "resnet50", "small_distilbert", (False, True)),
        (True, "small_resnet", "distilbert", (True, False)),
        (True, "resnet50", "distilbert", (False, False)),
        (False, "small_resnet", "small_distilbert", (False, False)),
        (False, "resnet50", "distilbert", (False, False)),
    ],
)
def test_only_the_demo_towers_of_a_pretrained_run_take_the_demo_weights(
    pretrained, image_encoder, text_encoder, expected
):
    config = namespace(pretrained=pretrained, image_encoder=image_encoder, text_encoder=text_encoder)
    assert tuple(bool(x) for x in pretrain.uses_pretrained_towers(config)) == expected
