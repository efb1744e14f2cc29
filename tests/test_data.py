"""Data layer: caption cleaning, image decoding, annotation formats, transforms, collation."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clipstudy.data.datasets import (
    CLIP_MEAN,
    CLIP_STD,
    DataError,
    RetrievalSet,
    TrainPairs,
    UnreadableImage,
    clean_caption,
    collate_skip_none,
    eval_transform,
    load_rgb_image,
    make_collate,
    train_transform,
)
from clipstudy.data.zeroshot import ZeroShotSet, clip_templates, imagenet_classnames, imagenet_wnids


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)


def save(image: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A Red Circle.", "a red circle"),
        ("top-left: a little CRIMSON disc!", "top left a little crimson disc"),
        ("  many\t\nspaces   here ", "many spaces here"),
        ("don't stop", "dont stop"),
        ("under_score & (brackets) #1", "under score brackets 1"),
        ("Café au lait", "café au lait"),
        ("!!! ...", ""),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_word_cap():
    words = [f"w{i}" for i in range(40)]
    assert clean_caption(" ".join(words)) == " ".join(words[:30])
    assert clean_caption("One, two, three four", max_words=2) == "one two"


# --------------------------------------------------------------------------- image modes


def rgb_at(path, xy=(0, 0)):
    image = load_rgb_image(path)
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_gray_and_bilevel(tmp_path):
    assert rgb_at(save(Image.new("L", (4, 4), 100), tmp_path / "l.png")) == (100, 100, 100)
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((1, 0), 1)
    path = save(bilevel, tmp_path / "one.png")
    assert rgb_at(path, (0, 0)) == (0, 0, 0) and rgb_at(path, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("alpha", [0, 128, 255])
def test_alpha_is_composited_on_white(tmp_path, alpha):
    def on_white(value):  # over-operator with a white background
        return round(value * alpha / 255 + 255 * (1 - alpha / 255))

    rgba = save(Image.new("RGBA", (4, 4), (200, 20, 60, alpha)), tmp_path / "rgba.png")
    assert all(abs(a - b) <= 1 for a, b in zip(rgb_at(rgba), (on_white(200), on_white(20), on_white(60))))
    la = save(Image.new("LA", (4, 4), (100, alpha)), tmp_path / "la.png")
    assert all(abs(v - on_white(100)) <= 1 for v in rgb_at(la))


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette.putpixel((1, 0), 2)
    plain = save(palette, tmp_path / "p.png")
    assert rgb_at(plain, (0, 0)) == (255, 0, 0) and rgb_at(plain, (1, 0)) == (0, 0, 255)
    clear = save(palette, tmp_path / "p_transparent.png", transparency=1)  # index 1 (red) transparent
    assert rgb_at(clear, (0, 0)) == (255, 255, 255) and rgb_at(clear, (1, 0)) == (0, 0, 255)


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert all(abs(a - b) <= 3 for a, b in zip(rgb_at(path, (4, 4)), (255, 0, 0)))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535, 25700, 257]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "gray16.png")
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    out = np.asarray(load_rgb_image(path))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert [out[0, i, 0] for i in (0, 2, 3, 4)] == [0, 255, 100, 1]  # x / 257


# --------------------------------------------------------------------------- bad images


def good_png(path):
    return save(Image.new("RGB", (32, 32), (10, 200, 30)), path)


def bad_images(folder):
    """name -> a path that must not decode."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = save(noisy, folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    jpeg = save(noisy, folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return {
        "missing": folder / "missing.png",
        "empty": folder / "empty.png",
        "text": folder / "text.png",
        "truncated png": folder / "truncated.png",
        "truncated jpeg": folder / "truncated.jpg",
    }


def test_unreadable_images_raise_with_reason(tmp_path):
    for name, path in bad_images(tmp_path).items():
        with pytest.raises(UnreadableImage) as caught:
            load_rgb_image(path)
        assert caught.value.path == str(path) and caught.value.reason, name
    assert load_rgb_image(tmp_path / "full.png").size == (64, 64)  # the untruncated originals are fine


def test_bad_images_become_none_with_a_warning(tmp_path, caplog):
    bad = bad_images(tmp_path / "images")
    good_png(tmp_path / "images" / "good.png")
    entries = [{"image": "good.png", "caption": "fine", "image_id": 0}]
    entries += [{"image": p.name, "caption": name, "image_id": i + 1} for i, (name, p) in enumerate(bad.items())]
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(entries))
    pairs = TrainPairs(ann, tmp_path / "images", eval_transform(16))
    assert pairs[0][0].shape == (3, 16, 16)
    for i, path in enumerate(bad.values(), start=1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipstudy.data.datasets"):
            assert pairs[i] is None
        assert path.name in caplog.text


# --------------------------------------------------------------------------- annotation errors


@pytest.mark.parametrize(
    "content, words",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"image": "a.png", "caption": "x"}), "expected a list"),
        (json.dumps([{"image": "a.png"}]), "'caption'"),
        (json.dumps([{"caption": "x", "image_id": 1}]), "'image'"),
        (json.dumps([{"image": "a.png", "caption": 3, "image_id": 1}]), "'caption'"),
        (json.dumps([{"image": "a.png", "caption": "x", "image_id": [1]}]), "'image_id'"),
        (json.dumps(["a.png"]), "not an object"),
        (json.dumps([]), "empty"),
    ],
)
def test_malformed_train_annotations(tmp_path, content, words):
    ann = tmp_path / "bad_train.json"
    ann.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as caught:
        TrainPairs(ann, tmp_path / "images", eval_transform(8))
    assert str(ann) in str(caught.value) and words in str(caught.value)


def test_missing_files_and_folders(tmp_path):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"image": "a.png", "caption": "x", "image_id": 0}]))
    with pytest.raises(DataError, match="no_such_root"):
        TrainPairs(ann, tmp_path / "no_such_root", eval_transform(8))
    with pytest.raises(DataError, match="absent.json"):
        TrainPairs(tmp_path / "absent.json", tmp_path, eval_transform(8))
    with pytest.raises(DataError, match="no_such_root"):
        RetrievalSet(ann, tmp_path / "no_such_root", eval_transform(8))
    with pytest.raises(DataError, match="no_such_folder"):
        ZeroShotSet(tmp_path / "no_such_folder", eval_transform(8))


def test_retrieval_rejects_bad_caption_lists(tmp_path):
    ann = tmp_path / "ret.json"
    for captions in ([], [1, 2], {"a": 1}):
        ann.write_text(json.dumps([{"image": "a.png", "caption": captions}]))
        with pytest.raises(DataError, match="ret.json"):
            RetrievalSet(ann, tmp_path, eval_transform(8))


# --------------------------------------------------------------------------- formats


def test_train_pairs_reads_entries(tmp_path):
    for name in ("a.png", "sub/b.png"):
        good_png(tmp_path / "img" / name)
    ann = tmp_path / "train.json"
    ann.write_text(
        json.dumps(
            [
                {"image": "a.png", "caption": "A Dog, running!", "image_id": 7},
                {"image": "sub/b.png", "caption": "Two cats.", "image_id": "x9"},
            ]
        )
    )
    pairs = TrainPairs(ann, tmp_path / "img", eval_transform(8))
    assert len(pairs) == 2 and pairs.captions == ["a dog running", "two cats"] and pairs.image_ids == [7, "x9"]
    image, caption, index = pairs[1]
    assert image.shape == (3, 8, 8) and caption == "two cats" and index == 1


def test_retrieval_set_flattens_captions(tmp_path):
    for name in ("x.png", "y.png", "z.png"):
        good_png(tmp_path / name)
    ann = tmp_path / "coco.json"
    ann.write_text(
        json.dumps(
            [
                {"image": "x.png", "caption": ["A cat.", "Two DOGS!"]},
                {"image": "y.png", "caption": "single caption"},
                {"image": "z.png", "caption": ["one", "two", "three"]},
            ]
        )
    )
    ret = RetrievalSet(ann, tmp_path, eval_transform(8))
    assert ret.texts == ["a cat", "two dogs", "single caption", "one", "two", "three"]
    assert ret.txt2img == [0, 0, 1, 2, 2, 2]
    assert ret.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert ret.images == ["x.png", "y.png", "z.png"] and len(ret) == 3
    image, index = ret[2]
    assert image.shape == (3, 8, 8) and index == 2


def make_folder(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            good_png(root / name / f"{k}.png")
    return root


def test_zeroshot_classnames_json(tmp_path):
    root = make_folder(tmp_path / "zs", ["b_cls", "a_cls"])
    (root / "empty_cls").mkdir()
    (root / "notes.txt").write_text("not a class")
    (root / "classnames.json").write_text(
        json.dumps(
            {"classnames": {"a_cls": "apple", "b_cls": "banana", "empty_cls": "nothing"}, "templates": ["a {}."]}
        )
    )
    zs = ZeroShotSet(root, eval_transform(8))
    assert zs.classes == ["a_cls", "b_cls", "empty_cls"]  # sorted; empty folders stay classes
    assert zs.classnames == ["apple", "banana", "nothing"] and zs.templates == ["a {}."]
    assert zs.targets == [0, 0, 1, 1] and len(zs) == 4
    image, label = zs[3]
    assert image.shape == (3, 8, 8) and label == 1
    # explicit arguments win over the file
    zs = ZeroShotSet(root, eval_transform(8), classnames=["x", "y", "z"], templates=["{}!"])
    assert zs.classnames == ["x", "y", "z"] and zs.templates == ["{}!"]
    zs = ZeroShotSet(root, eval_transform(8), classnames={"a_cls": "A", "b_cls": "B", "empty_cls": "E"})
    assert zs.classnames == ["A", "B", "E"] and zs.templates == ["a {}."]
    with pytest.raises(DataError, match="3 class"):
        ZeroShotSet(root, eval_transform(8), classnames=["only one"])


def test_zeroshot_classnames_json_must_cover_every_folder(tmp_path):
    root = make_folder(tmp_path / "zs", ["a", "b"])
    (root / "classnames.json").write_text(json.dumps({"classnames": {"a": "apple"}}))
    with pytest.raises(DataError, match="classnames.json"):
        ZeroShotSet(root, eval_transform(8))
    (root / "classnames.json").write_text(json.dumps({"classnames": {"a": "x", "b": "y"}, "templates": ["no slot"]}))
    with pytest.raises(DataError, match="templates"):
        ZeroShotSet(root, eval_transform(8))


def test_zeroshot_imagenet_wnids_and_plain_folders(tmp_path):
    imagenet = ZeroShotSet(make_folder(tmp_path / "in", ["n01443537", "n01440764", "n15075141"], 1), eval_transform(8))
    # ImageNet class index 0 tench, 1 goldfish, 999 toilet paper (toilet tissue)
    assert imagenet.classnames == ["tench", "goldfish", "toilet paper"]
    assert imagenet.templates == clip_templates() and len(imagenet.templates) == 80
    plain = ZeroShotSet(make_folder(tmp_path / "plain", ["sea_lion", "dog"], 1), eval_transform(8))
    assert plain.classes == ["dog", "sea_lion"] and plain.classnames == ["dog", "sea lion"]
    assert plain.templates == clip_templates()


def test_imagenet_metadata():
    wnids, names, templates = imagenet_wnids(), imagenet_classnames(), clip_templates()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert (wnids[0], names[0]) == ("n01440764", "tench") and (wnids[1], names[1]) == ("n01443537", "goldfish")
    assert templates[0] == "a bad photo of a {}."


# --------------------------------------------------------------------------- transforms


def test_eval_transform_normalises_with_clip_statistics():
    colour = (128, 64, 32)
    out = eval_transform(12)(Image.new("RGB", (40, 20), colour))
    assert out.shape == (3, 12, 12)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-3)


def test_train_transform_options():
    from torchvision import transforms as T

    steps = [type(t) for t in train_transform(16).transforms]
    assert steps == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandAugment, T.ToTensor, T.Normalize]
    randaugment = train_transform(16).transforms[2]
    assert (randaugment.num_ops, randaugment.magnitude) == (2, 7)
    crop = train_transform(16).transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    plain = train_transform(16, crop_scale=None, hflip=False, randaugment=None)
    assert [type(t) for t in plain.transforms] == [T.Resize, T.ToTensor, T.Normalize]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    assert torch.equal(plain(image), eval_transform(16)(image))
    assert train_transform(16)(image).shape == (3, 16, 16)


def test_transforms_equal_torchvision_compose_bit_for_bit():
    """The fused ToTensor + Normalize ending gives exactly torchvision's output, augmentation included."""
    from torchvision import transforms as T

    from clipstudy.data.datasets import Compose

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8))
    gray = image.convert("L")  # not RGB: runs through torchvision's own steps
    cases = [(t, image) for t in (train_transform(24), train_transform(24, randaugment=None), eval_transform(24))]
    cases += [(Compose([T.ToTensor(), T.Normalize((0.5,), (0.25,))]), picture) for picture in (image, gray)]
    for transform, picture in cases:
        reference = T.Compose(transform.transforms)
        for seed in range(4):
            torch.manual_seed(seed)
            ours = transform(picture)
            torch.manual_seed(seed)
            assert torch.equal(ours, reference(picture))
            assert ours.dtype == torch.float32 and ours.is_contiguous()


# --------------------------------------------------------------------------- collation


def test_make_collate_tokenises_and_drops_unreadable(demo_data_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_data_dir / "tokenizer"))
    pairs = TrainPairs(demo_data_dir / "train.json", demo_data_dir / "images", eval_transform(32))
    collate = pickle.loads(pickle.dumps(make_collate(tokenizer, max_length=12)))  # DataLoader workers pickle it
    batch = collate([pairs[3], None, pairs[5]])
    assert batch["skipped"] == 1 and batch["images"].shape == (2, 3, 32, 32)
    assert batch["index"].tolist() == [3, 5]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    expected = tokenizer(pairs.captions[5], padding="max_length", truncation=True, max_length=12)["input_ids"]
    assert batch["input_ids"][1].tolist() == expected
    empty = collate([None, None])
    assert empty["skipped"] == 2 and empty["images"].shape[0] == 0 and empty["input_ids"].shape == (0, 12)
    assert empty["index"].shape == (0,)


def test_collate_skip_none():
    items = [(torch.ones(3, 4, 4), 2), None, (torch.zeros(3, 4, 4), 0)]
    images, ids = collate_skip_none(items)
    assert images.shape == (2, 3, 4, 4) and ids.tolist() == [2, 0] and ids.dtype == torch.long
    images, ids = collate_skip_none([None])
    assert images.shape[0] == 0 and ids.shape == (0,)


def test_decoded_image_cache_reads_each_file_once_and_retries_unreadable(tmp_path, monkeypatch):
    import clipstudy.data.images as images_mod  # where the data sets' ImageReader reads

    for i in range(3):
        save(Image.new("RGB", (8, 8), (40 * i, 0, 0)), tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"image": f"{i}.png", "caption": "c", "image_id": i} for i in range(3)]))
    reads = []
    real = images_mod.load_rgb_image
    monkeypatch.setattr(images_mod, "load_rgb_image", lambda path: reads.append(str(path)) or real(path))

    cached = TrainPairs(ann, tmp_path / "img", to_tensor, cache_images=True)
    disk = TrainPairs(ann, tmp_path / "img", to_tensor)
    for _ in range(3):  # three epochs
        for i in range(3):
            a, b = cached[i], disk[i]
            assert (a is None) == (b is None) == (i == 2)
            if a is not None:
                assert torch.equal(a[0], b[0])
    # disk: 3 epochs x 3 files; cached: files 0 and 1 once, the unreadable file every epoch
    assert len(reads) == 9 + 2 + 3
    assert sorted(cached._reader.cache) == [0, 1]
