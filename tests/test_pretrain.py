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
