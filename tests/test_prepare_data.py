"""prepare-data: miniature downloads in each layout -> the study's formats, counted skips, reruns."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.data.check import check_data
from clipstudy.data.datasets import eval_transform
from clipstudy.data.prepare import cc3m as cc3m_module
from clipstudy.data.prepare.cc3m import prepare_cc3m
from clipstudy.data.prepare.coco import prepare_coco_karpathy
from clipstudy.data.prepare.common import (
    Prepared,
    PrepareError,
    ensure_link,
    progress_bar,
    read_json,
    require_path,
    write_json_if_changed,
    write_text_if_changed,
)
from clipstudy.data.prepare.imagenet import (
    prepare_imagenet_train_slice,
    prepare_imagenet_val,
    read_devkit_ground_truth,
    read_devkit_meta,
    read_loc_val_solution,
    read_val_labels,
)
from clipstudy.data.zeroshot import ZeroShotSet, imagenet_classnames, imagenet_wnids

FAILED, NO_CAPTION, BROKEN = "000000003", "000000005", "000000007"


def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def cc3m_samples(n: int = 12, size: tuple[int, int] = (40, 30)) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes}, as img2dataset writes them, with the three kinds of bad sample."""
    samples = {}
    for i in range(n):
        key = f"{i:09d}"
        meta = {"key": key, "status": "success", "url": f"http://example.com/{i}.jpg"}
        members = {"jpg": jpeg(*size, seed=i), "txt": f"Caption number {i}, a photo.".encode()}
        if key == FAILED:
            meta.update(status="failed_to_download", error_message="HTTP 404")
            members = {}
        elif key == NO_CAPTION:
            del members["txt"]
        elif key == BROKEN:
            members["jpg"] = b"\xff\xd8 this is not really a jpeg"
        members["json"] = json.dumps(meta).encode()
        samples[key] = members
    return samples


def shard_of(key: str) -> str:
    return "00000" if int(key) < 6 else "00001"


def write_files_layout(root: Path, samples) -> Path:
    for key, members in samples.items():
        folder = root / shard_of(key)
        folder.mkdir(parents=True, exist_ok=True)
        for ext, data in members.items():
            (folder / f"{key}.{ext}").write_bytes(data)
    (root / "00000_stats.json").write_text(json.dumps({"count": 6, "failed_to_download": 1}))
    return root


def write_webdataset_layout(root: Path, samples, stray: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tars = {}
    for key, members in samples.items():
        shard = shard_of(key)
        tar = tars.get(shard) or tars.setdefault(shard, tarfile.open(root / f"{shard}.tar", "w"))
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if stray:
        info = tarfile.TarInfo("README")
        info.size = 5
        tars["00000"].addfile(info, io.BytesIO(b"hello"))
    for tar in tars.values():
        tar.close()
    return root


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


GOOD = [f"{i:09d}" for i in range(12) if f"{i:09d}" not in (FAILED, NO_CAPTION, BROKEN)]


# --------------------------------------------------------------------------- cc3m


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_cc3m_counts_skips_and_check_data(tmp_path, layout):
    samples = cc3m_samples()
    writer = write_files_layout if layout == "files" else write_webdataset_layout
    src = writer(tmp_path / "src", samples)
    before = tree_digest(src)
    result = prepare_cc3m(src, tmp_path / "out", progress=False)
    entries = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [e["image_id"] for e in entries] == [int(k) for k in GOOD]
    assert [e["caption"] for e in entries] == [f"Caption number {int(k)}, a photo." for k in GOOD]
    assert result.counts["pairs"] == 9 and result.counts["samples"] == 12
    assert result.skipped["download failed (status in .json is not success)"] == 1
    assert result.skipped["missing or empty caption (.txt)"] == 1
    assert result.skipped["image does not decode"] == 1
    stray = result.skipped["stray member (not an image, .txt or .json of a sample)"]
    assert stray == (1 if layout == "webdataset" else 0)
    for entry in entries:  # the image bytes arrive unchanged
        written = (tmp_path / "out" / "images" / entry["image"]).read_bytes()
        assert written == samples[f"{entry['image_id']:09d}"]["jpg"]
    if layout == "files":  # links, not copies
        assert (tmp_path / "out" / "images" / entries[0]["image"]).is_symlink()
    report = check_data(**result.fields)
    assert report["ok"] and report["train"]["readable_images"] == 9 and not report["train"]["unreadable_files"]
    assert tree_digest(src) == before  # the input is never modified


def expected_subset(keys, seed: int, n: int) -> list[str]:
    return sorted(sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())[:n])


def test_cc3m_limit_is_deterministic_and_layout_independent(tmp_path):
    samples = cc3m_samples()
    files = write_files_layout(tmp_path / "files", samples)
    tars = write_webdataset_layout(tmp_path / "tars", samples)
    chosen = {}
    for name, src, seed, out in [
        ("a", files, 1, "a"),
        ("b", files, 1, "b"),
        ("tar", tars, 1, "t"),
        ("seed2", files, 2, "c"),
    ]:
        prepare_cc3m(src, tmp_path / out, limit=4, seed=seed, workers=3, progress=False)
        chosen[name] = [f"{e['image_id']:09d}" for e in json.loads((tmp_path / out / "train.json").read_text())]
    # Ranks are over samples with an image; the broken one may rank high, then the next one is taken.
    assert chosen["a"] == chosen["b"] == chosen["tar"] == expected_subset(GOOD, 1, 4)
    assert chosen["seed2"] == expected_subset(GOOD, 2, 4) != chosen["a"]


def test_cc3m_max_side_resizes_keeping_aspect(tmp_path):
    src = write_files_layout(tmp_path / "src", cc3m_samples(size=(160, 120)))
    prepare_cc3m(src, tmp_path / "out", max_side=40, progress=False)
    for entry in json.loads((tmp_path / "out" / "train.json").read_text()):
        path = tmp_path / "out" / "images" / entry["image"]
        assert not path.is_symlink() and path.suffix == ".jpg"
        with Image.open(path) as image:
            assert image.size == (40, 30) and image.format == "JPEG"
    # images already within the limit keep their bytes (no second lossy encode)
    samples = cc3m_samples(size=(160, 120))
    prepare_cc3m(src, tmp_path / "big", max_side=160, progress=False)
    for entry in json.loads((tmp_path / "big" / "train.json").read_text()):
        written = (tmp_path / "big" / "images" / entry["image"]).read_bytes()
        assert written == samples[f"{entry['image_id']:09d}"]["jpg"]


def test_cc3m_rerun_skips_unchanged_and_repairs_by_content(tmp_path):
    src = write_webdataset_layout(tmp_path / "src", cc3m_samples())
    out = tmp_path / "out"
    prepare_cc3m(src, out, max_side=20, progress=False)
    ann = (out / "train.json").read_bytes()
    again = prepare_cc3m(src, out, max_side=20, progress=False)
    assert again.counts["reused_from_earlier_run"] == 9 and (out / "train.json").read_bytes() == ann
    victim = out / "images" / json.loads(ann)[2]["image"]
    good = victim.read_bytes()
    victim.write_bytes(jpeg(20, 15, seed=99))  # same name, other content: must be redone
    third = prepare_cc3m(src, out, max_side=20, progress=False)
    assert third.counts["reused_from_earlier_run"] == 8 and victim.read_bytes() == good
    # a smaller subset removes the images it no longer uses
    prepare_cc3m(src, out, max_side=20, limit=3, progress=False)
    assert len(list((out / "images" / "cc3m").rglob("*.jpg"))) == 3


def test_cc3m_rerun_removes_the_image_of_a_sample_gone_from_the_download(tmp_path):
    """An image an earlier run wrote whose sample this run never sees (deleted from the download) goes too."""
    samples = cc3m_samples()
    src = write_files_layout(tmp_path / "src", samples)
    out = tmp_path / "out"
    first = prepare_cc3m(src, out, max_side=20, progress=False)
    images = {e["image"] for e in json.loads((out / "train.json").read_text())}
    assert first.counts["pairs"] == len(images) == 9
    gone = sorted(images)[0]
    key = Path(gone).stem
    for path in src.rglob(f"{key}.*"):
        path.unlink()
    again = prepare_cc3m(src, out, max_side=20, progress=False)
    assert again.counts["pairs"] == 8 and again.counts["unused_images_removed"] == 1
    assert not (out / "images" / gone).exists()
    assert sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.jpg")) == sorted(
        images - {gone}
    )


def test_cc3m_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["prepare-data", "cc3m", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--json"]
    assert clipstudy_main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == ""  # a failed --json run leaves stdout empty, nothing to misparse
    assert "\n" not in err and str(tmp_path / "empty") in err and "img2dataset" in err
    with pytest.raises(PrepareError, match="inside --src"):
        prepare_cc3m(write_files_layout(tmp_path / "src", cc3m_samples(3)), tmp_path / "src" / "out")


# --------------------------------------------------------------------------- coco-karpathy


def karpathy_file(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "train2014").mkdir()
    images = []
    for i, split in enumerate(["train", "test", "val", "test", "restval", "test", "test"]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        if i != 5:  # test image 5 was never downloaded
            (root / folder / name).write_bytes(jpeg(24, 16, seed=i))
        sentences = [{"raw": f"Image {i} caption {j}.", "tokens": []} for j in range(5)]
        if i == 6:
            sentences = []
        images.append({"filepath": folder, "filename": name, "split": split, "sentences": sentences, "cocoid": 100 + i})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root


def test_coco_karpathy_writes_test_and_val_with_captions_in_order(tmp_path):
    split_file, root = karpathy_file(tmp_path)
    result = prepare_coco_karpathy(split_file, root, tmp_path / "out", progress=False)
    entries = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert [e["image"] for e in entries] == [
        "coco/val2014/COCO_val2014_000000000001.jpg",
        "coco/val2014/COCO_val2014_000000000003.jpg",
    ]
    assert entries[1]["caption"] == [f"Image 3 caption {j}." for j in range(5)]
    val = json.loads((tmp_path / "out" / "val_retrieval.json").read_text())  # Karpathy val: image 2 only
    assert [e["image"] for e in val] == ["coco/val2014/COCO_val2014_000000000002.jpg"] and val[0]["image_id"] == 102
    assert result.counts == {"test_images": 2, "test_captions": 10, "val_images": 1, "val_captions": 5}
    assert result.skipped == {"test: image file missing or empty under the COCO root": 1, "test: no caption": 1}
    report = check_data(**result.fields)
    assert report["ok"] and report["retrieval"]["readable_images"] == 2 and report["retrieval"]["texts"] == 10
    assert report["val_retrieval"]["readable_images"] == 1 and report["val_retrieval"]["texts"] == 5


# --------------------------------------------------------------------------- imagenet-val

WNIDS = imagenet_wnids()
# Devkit numbering (ILSVRC2012_ID 1, 2, ...) in an order that is not the sorted order.
DEVKIT_ORDER = [WNIDS[500], WNIDS[3], WNIDS[999], WNIDS[0], WNIDS[42]]
# Image i (1-based) -> its class (a wnid), by the test's own table.
TRUTH = {1: WNIDS[500], 2: WNIDS[0], 3: WNIDS[999], 4: WNIDS[500], 5: WNIDS[42], 6: WNIDS[3]}


def flat_val(tmp_path: Path) -> Path:
    flat = tmp_path / "val"
    flat.mkdir()
    for i in TRUTH:
        (flat / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(20, 20, seed=i))
    (flat / "LICENSE.txt").write_text("not an image")
    return flat


def write_devkit(folder: Path) -> Path:
    import scipy.io

    folder.mkdir(parents=True)
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    rows = [(i + 1, wnid, f"words {wnid}", "gloss", 0, np.zeros(0), 0, 1300) for i, wnid in enumerate(DEVKIT_ORDER)]
    rows.append((1001, "n00001740", "entity", "gloss", 2, np.array([1, 2]), 19, 0))  # an inner node: ignored
    synsets = np.empty((len(rows), 1), dtype=[(name, object) for name in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    scipy.io.savemat(str(folder / "meta.mat"), {"synsets": synsets})
    ids = {wnid: i + 1 for i, wnid in enumerate(DEVKIT_ORDER)}
    truth = folder / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("".join(f"{ids[TRUTH[i]]}\n" for i in sorted(TRUTH)) + "2\n")  # line 7: no such image
    return truth


def write_loc_csv(path: Path) -> Path:
    rows = [f"ILSVRC2012_val_{i:08d},{wnid} 1 2 30 40 {wnid} 5 5 9 9" for i, wnid in TRUTH.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("labels", ["devkit", "loc_csv"])
def test_imagenet_val_class_folders_follow_clipstudy_order(tmp_path, labels):
    flat = flat_val(tmp_path)
    label_file = write_devkit(tmp_path / "devkit" / "data") if labels == "devkit" else write_loc_csv(tmp_path / "s.csv")
    before = tree_digest(flat)
    result = prepare_imagenet_val(flat, label_file, tmp_path / "out", progress=False)
    zeroshot = ZeroShotSet(result.fields["zeroshot_images"], eval_transform(16))
    assert zeroshot.classes == WNIDS and zeroshot.classnames == imagenet_classnames()
    got = {Path(path).name: label for path, label in zeroshot.samples}
    assert got == {f"ILSVRC2012_val_{i:08d}.JPEG": WNIDS.index(wnid) for i, wnid in TRUTH.items()}
    assert result.skipped == {"not an ILSVRC2012_val_*.JPEG file": 1}
    assert result.counts["images"] == 6 and result.counts["classes_with_images"] == 5
    assert result.counts["labels_without_image"] == (1 if labels == "devkit" else 0)
    assert check_data(**result.fields)["zeroshot"]["readable_images"] == 6
    assert tree_digest(flat) == before
    again = prepare_imagenet_val(flat, label_file, tmp_path / "out", progress=False)
    assert again.counts["links_made"] == 0


def test_imagenet_val_relabel_moves_links_and_bad_labels_fail(tmp_path, capsys):
    flat = flat_val(tmp_path)
    csv_file = write_loc_csv(tmp_path / "s.csv")
    prepare_imagenet_val(flat, csv_file, tmp_path / "out", progress=False)
    text = csv_file.read_text().replace(f"val_00000002,{WNIDS[0]}", f"val_00000002,{WNIDS[7]}")
    csv_file.write_text(text)
    prepare_imagenet_val(flat, csv_file, tmp_path / "out", progress=False)
    assert sorted(p.parent.name for p in (tmp_path / "out" / "zeroshot").glob("*/ILSVRC2012_val_00000002.JPEG")) == [
        WNIDS[7]
    ]
    bad = tmp_path / "gt.txt"
    bad.write_text("1\n")  # no meta.mat beside it
    code = clipstudy_main(
        ["prepare-data", "imagenet-val", "--src", str(flat), "--labels", str(bad), "--out", str(tmp_path / "o2")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "meta.mat" in err


# --------------------------------------------------------------------------- the whole path


# ------------------------------------------------------------------ imagenet-train-slice (zero-shot validation)

# Class -> how many train images it has in the test's own folder (class 7 has too few; class 2 none).
TRAIN_COUNTS = {WNIDS[0]: 5, WNIDS[7]: 1, WNIDS[999]: 4}


def train_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for c, (wnid, count) in enumerate(TRAIN_COUNTS.items()):
        (root / wnid).mkdir(parents=True)
        for k in range(count):
            (root / wnid / f"{wnid}_{100 + k}.JPEG").write_bytes(jpeg(18, 18, seed=10 * c + k))
    (root / WNIDS[0] / "notes.txt").write_text("not an image of the class")
    return root


def test_imagenet_train_slice_is_class_balanced_seeded_and_counted(tmp_path):
    src = train_folder(tmp_path)
    before = tree_digest(src)
    result = prepare_imagenet_train_slice(src, tmp_path / "out", per_class=2, seed=0, progress=False)
    assert tree_digest(src) == before  # inputs are never written
    zeroshot = ZeroShotSet(result.fields["val_zeroshot_images"], eval_transform(16))
    assert zeroshot.classes == WNIDS  # every class folder, so class indices match the test set's
    per_class = {}
    for path, label in zeroshot.samples:
        per_class.setdefault(WNIDS[label], []).append(Path(path).name)
    assert {wnid: len(names) for wnid, names in per_class.items()} == {WNIDS[0]: 2, WNIDS[7]: 1, WNIDS[999]: 2}
    assert all(name.startswith(wnid) for wnid, names in per_class.items() for name in names)
    assert result.counts["classes_short_of_per_class"] == 1  # class 7 (1 image); absent classes are skips
    assert result.skipped["not a <wnid>_N.JPEG file of its class"] == 1
    assert result.skipped["class folder missing in the train folder"] == 997
    again = prepare_imagenet_train_slice(src, tmp_path / "again", per_class=2, seed=0, progress=False)
    other = prepare_imagenet_train_slice(src, tmp_path / "other", per_class=2, seed=5, progress=False)

    def chosen(prepared):
        return sorted(Path(p).name for p, _ in ZeroShotSet(prepared.fields["val_zeroshot_images"], None).samples)

    assert chosen(again) == chosen(result) != chosen(other)  # seeded: repeats, and another seed picks others


def test_json_output_feeds_check_data_and_train(tmp_path, capsys, demo_data_dir):
    cc3m = write_webdataset_layout(tmp_path / "cc3m", cc3m_samples(n=24))
    split_file, coco_root = karpathy_file(tmp_path)
    flat = flat_val(tmp_path)
    out = tmp_path / "data"
    fields = {}
    for argv in (
        ["cc3m", "--src", str(cc3m), "--max-side", "32"],
        ["coco-karpathy", "--src", str(split_file), "--images", str(coco_root)],
        ["imagenet-val", "--src", str(flat), "--labels", str(write_loc_csv(tmp_path / "s.csv"))],
        ["imagenet-train-slice", "--src", str(train_folder(tmp_path)), "--per-class", "2"],
    ):
        assert clipstudy_main(["prepare-data", *argv, "--out", str(out), "--json"]) == 0
        stdout = capsys.readouterr().out
        fields.update(json.loads(stdout))  # nothing but one JSON object on stdout
    assert sorted(fields) == [
        "retrieval_ann",
        "retrieval_images",
        "train_ann",
        "train_images",
        "val_retrieval_ann",
        "val_retrieval_images",
        "val_zeroshot_images",
        "zeroshot_images",
    ]
    check_args = [f"--{key.replace('_', '-')}={value}" for key, value in fields.items()]
    assert clipstudy_main(["check-data", *check_args]) == 0
    capsys.readouterr()
    train_args = [f"--{key}={value}" for key, value in fields.items()]
    code = clipstudy_main(
        [
            "train",
            "--profile",
            "smoke",
            *train_args,
            "--tokenizer",
            str(demo_data_dir / "tokenizer"),
            "--epochs",
            "1",
            "--max_steps",
            "2",
            "--batch_size",
            "8",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed"


# =========================================================================== every counted skip, on constructed input
# (fast, in process: the mutation score of the converters rests on these; expectations are worked out by hand)
def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def png(width: int, height: int, mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def gray_jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- common


def test_prepared_counts_every_skip_and_keeps_the_first_three_names():
    result = Prepared(fields={})
    for name in ["a", "b", "c", "d", "e"]:
        result.skip("why", name)
    result.skip("other", "z")
    assert result.skipped == {"why": 5, "other": 1}
    assert result.examples == {"why": ["a", "b", "c"], "other": ["z"]}


def test_progress_bar_goes_to_stderr_unless_progress_is_false(capsys):
    assert list(progress_bar([1, 2, 3], desc="step", unit="thing")) == [1, 2, 3]
    captured = capsys.readouterr()
    assert captured.out == "" and "step: 100%" in captured.err and "3/3" in captured.err
    assert "thing/s" in captured.err
    assert list(progress_bar([1, 2], desc="shown", progress=True)) == [1, 2]
    assert "shown: 100%" in capsys.readouterr().err
    assert list(progress_bar([1, 2], desc="quiet", progress=False)) == [1, 2]
    assert capsys.readouterr().err == ""


def test_write_text_if_changed_writes_only_a_difference(tmp_path):
    path = tmp_path / "a.txt"
    assert write_text_if_changed(path, "café\n") is True  # new file
    assert path.read_bytes() == "café\n".encode()
    assert write_text_if_changed(path, "café\n") is False  # the same text: untouched
    assert write_text_if_changed(path, "other") is True and path.read_bytes() == b"other"
    path.write_bytes(b"\xff\xfe not utf-8")
    assert write_text_if_changed(path, "x") is True and path.read_bytes() == b"x"  # unreadable: rewritten


def test_write_json_if_changed_writes_indented_unescaped_json_with_a_final_newline(tmp_path):
    path = tmp_path / "a.json"
    assert write_json_if_changed(path, [{"a": "é"}]) is True
    assert path.read_bytes() == '[\n {\n  "a": "é"\n }\n]\n'.encode()
    assert write_json_if_changed(path, [{"a": "é"}]) is False


def test_ensure_link_makes_repairs_and_refuses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target").mkdir()
    (tmp_path / "other").mkdir()
    link = tmp_path / "deep" / "er" / "link"
    assert ensure_link(link, Path("target")) is True  # parents made; the target made absolute
    assert os.readlink(link) == str(tmp_path / "target")
    assert ensure_link(link, tmp_path / "target") is False  # already right
    assert ensure_link(link, Path("other")) is True and os.readlink(link) == str(tmp_path / "other")
    sibling = tmp_path / "deep" / "er" / "sibling"  # its folder exists already
    assert ensure_link(sibling, tmp_path / "target") is True and os.readlink(sibling) == str(tmp_path / "target")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    assert ensure_link(dangling, tmp_path / "target") is True and os.readlink(dangling) == str(tmp_path / "target")
    copy = tmp_path / "copy"
    copy.write_text("a file where the link goes")
    assert ensure_link(copy, tmp_path / "target") is True and os.readlink(copy) == str(tmp_path / "target")
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(PrepareError) as error:
        ensure_link(folder, tmp_path / "target")
    assert (
        str(error.value) == f"{folder}: exists and is not a link this command made; remove it or choose another --out"
    )
    assert folder.is_dir() and not folder.is_symlink()


def test_require_path_and_read_json_name_the_file_and_the_fix(tmp_path):
    file = tmp_path / "f.json"
    file.write_text('{"a": 1}')
    assert require_path(file, "thing", "fix it") == file
    assert require_path(tmp_path, "place", "fix it", folder=True) == tmp_path
    with pytest.raises(PrepareError) as error:
        require_path(tmp_path, "thing", "fix it")  # a folder is not a file
    assert str(error.value) == f"{tmp_path}: thing not found; fix it"
    with pytest.raises(PrepareError) as error:
        require_path(file, "place", "pass a folder", folder=True)
    assert str(error.value) == f"{file}: place not found; pass a folder"
    assert read_json(file, "what") == {"a": 1}
    file.write_text("{oops")
    with pytest.raises(PrepareError) as error:
        read_json(file, "split file")
    message = str(error.value)
    assert message.startswith(f"{file}: not valid JSON (") and message.endswith("); pass the split file")
    file.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(PrepareError, match="not valid JSON"):
        read_json(file, "split file")


# --------------------------------------------------------------------------- coco-karpathy, every skip


def karpathy_items(root: Path) -> list[dict]:
    """Each kind of item, by the test's own table: kept, empty or missing image, no usable caption, other split."""
    (root / "val2014").mkdir(parents=True)

    def item(name, split, sentences, size=None, **extra):
        if size is not None:
            (root / "val2014" / name).write_bytes(b"x" * size)
        return {"filepath": "val2014", "filename": name, "split": split, "sentences": sentences, **extra}

    good = [
        {"raw": "  A cat.  ", "tokens": []},
        {"raw": ""},
        {"tokens": ["no", "raw"]},
        {"raw": None},
        "text",
        {"raw": 5},
    ]
    return [
        item("t0.jpg", "train", [{"raw": "Train."}], size=10, cocoid=900),  # another split: neither kept nor counted
        item("a.jpg", "test", [{"raw": "A."}, {"raw": "B."}], size=20, cocoid=10),
        item("empty.jpg", "test", [{"raw": "Empty."}], size=0, cocoid=11),
        item("one.jpg", "test", [{"raw": "One byte."}], size=1, cocoid=12),  # tiny but not empty: kept
        item("r0.jpg", "restval", [{"raw": "Restval."}], size=10, cocoid=901),
        item("missing.jpg", "val", [{"raw": "Never downloaded."}], cocoid=13),
        item("blank.jpg", "val", [{"raw": "   "}, {"tokens": []}, {"raw": None}, "x"], size=5, cocoid=14),
        item("b.jpg", "val", good, size=30),  # no cocoid: its index in the file (7)
        item("c.jpg", "test", [{"raw": "C."}], size=40, cocoid=16),
    ]


def test_coco_karpathy_counts_each_skip_per_split(tmp_path, capsys):
    root = tmp_path / "coco"
    split_file = tmp_path / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": karpathy_items(root)}))
    out = tmp_path / "out"
    result = prepare_coco_karpathy(split_file, root, out)  # progress shown by default
    err = capsys.readouterr().err
    assert "coco-karpathy test: 100%" in err and "coco-karpathy val: 100%" in err and "img/s" in err
    assert json.loads((out / "retrieval.json").read_text()) == [
        {"image": "coco/val2014/a.jpg", "caption": ["A.", "B."], "image_id": 10},
        {"image": "coco/val2014/one.jpg", "caption": ["One byte."], "image_id": 12},
        {"image": "coco/val2014/c.jpg", "caption": ["C."], "image_id": 16},
    ]
    assert json.loads((out / "val_retrieval.json").read_text()) == [
        {"image": "coco/val2014/b.jpg", "caption": ["A cat."], "image_id": 7}
    ]
    assert result.skipped == {
        "test: image file missing or empty under the COCO root": 1,
        "val: image file missing or empty under the COCO root": 1,
        "val: no caption": 1,
    }
    assert result.examples == {
        "test: image file missing or empty under the COCO root": ["val2014/empty.jpg"],
        "val: image file missing or empty under the COCO root": ["val2014/missing.jpg"],
        "val: no caption": ["val2014/blank.jpg"],
    }
    assert result.counts == {"test_images": 3, "test_captions": 4, "val_images": 1, "val_captions": 1}
    assert result.fields == {
        "retrieval_ann": str(out / "retrieval.json"),
        "val_retrieval_ann": str(out / "val_retrieval.json"),
        "retrieval_images": str(out / "images"),
        "val_retrieval_images": str(out / "images"),
    }
    assert os.readlink(out / "images" / "coco") == str(root)
    again = prepare_coco_karpathy(split_file, root, out, progress=False)
    assert capsys.readouterr().err == "" and again.counts == result.counts


def test_coco_karpathy_refuses_what_it_cannot_use(tmp_path, monkeypatch):
    fix = "pass Karpathy's dataset_coco.json (from caption_datasets.zip)"
    root = tmp_path / "coco"
    root.mkdir()
    split_file = tmp_path / "dataset_coco.json"

    def refused(images=root) -> str:
        with pytest.raises(PrepareError) as error:
            prepare_coco_karpathy(split_file, images, tmp_path / "out", progress=False)
        return str(error.value)

    assert refused() == f"{split_file}: split file not found; {fix}"
    split_file.write_text("{")
    message = refused()
    assert message.startswith(f"{split_file}: not valid JSON (")
    assert message.endswith("); pass the Karpathy split file dataset_coco.json")
    for top in ([], {"images": 5}, {"dataset": "coco"}):
        split_file.write_text(json.dumps(top))
        assert refused() == f"{split_file}: no 'images' list at the top level; {fix}"
    items = karpathy_items(root)
    split_file.write_text(json.dumps({"images": items}))
    (tmp_path / "a-file").write_text("")
    for images in (tmp_path / "nowhere", tmp_path / "a-file"):
        assert (
            refused(images)
            == f"{images}: COCO image root not found; pass the folder that holds val2014/ (and train2014/)"
        )
    for bad in ("text", {key: value for key, value in items[1].items() if key != "sentences"}):
        split_file.write_text(json.dumps({"images": [items[1], bad]}))
        assert refused() == f"{split_file}: images[1] lacks filepath/filename/split/sentences; {fix}"
    # exactly the four keys (no cocoid) are enough: the index stands in for the id
    minimal = {key: items[1][key] for key in ("filepath", "filename", "split", "sentences")}
    split_file.write_text(json.dumps({"images": [minimal, items[7]]}))
    result = prepare_coco_karpathy(split_file, root, tmp_path / "ok", progress=False)
    assert json.loads((tmp_path / "ok" / "retrieval.json").read_text())[0]["image_id"] == 0
    assert result.counts["val_images"] == 1
    split_file.write_text(json.dumps({"images": [items[1], items[6]]}))  # val: only an image without caption
    assert refused() == (
        f"{split_file}: no usable image of split 'val' (1 skipped: {{'val: no caption': 1}}); "
        "check the file and that --images holds val2014/"
    )


# --------------------------------------------------------------------------- imagenet, every skip


def test_loc_val_solution_reads_the_first_wnid_and_checks_its_columns(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text(
        "ImageId,PredictionString,Extra\n"
        "ILSVRC2012_val_00000001,n01440764 1 2 3 4 n01443537 5 6 7 8,x\n"
        "ILSVRC2012_val_00000002,,x\n"
        "ILSVRC2012_val_00000003\n"
    )
    assert read_loc_val_solution(path) == {
        "ILSVRC2012_val_00000001": "n01440764",
        "ILSVRC2012_val_00000002": "",
        "ILSVRC2012_val_00000003": "",
    }
    expected = (
        f"{path}: expected the columns ImageId,PredictionString of LOC_val_solution.csv; "
        "pass that file or the devkit's ILSVRC2012_validation_ground_truth.txt"
    )
    for text in ("", "ImageId,Label\nILSVRC2012_val_00000001,n01440764\n", "imageid,predictionstring\n"):
        path.write_text(text)
        with pytest.raises(PrepareError) as error:
            read_loc_val_solution(path)
        assert str(error.value) == expected


def test_devkit_labels_name_the_bad_line_and_the_missing_meta(tmp_path):
    truth = write_devkit(tmp_path / "devkit" / "data")
    meta = truth.parent / "meta.mat"
    assert read_devkit_meta(meta) == {i + 1: wnid for i, wnid in enumerate(DEVKIT_ORDER)}  # the inner node left out
    assert read_devkit_ground_truth(truth, meta)["ILSVRC2012_val_00000001"] == TRUTH[1]
    assert len(read_devkit_ground_truth(truth, meta)) == 7
    fix = "pass the devkit's ILSVRC2012_validation_ground_truth.txt"
    for text, line, shown in (("1\nabc\n", 2, "'abc'"), ("1\n2\n77\n", 3, "'77'")):
        truth.write_text(text)
        with pytest.raises(PrepareError) as error:
            read_devkit_ground_truth(truth, meta)
        assert str(error.value) == f"{truth}: line {line} is {shown}, not an ILSVRC2012_ID of {meta}; {fix}"
    with pytest.raises(PrepareError) as error:
        read_val_labels(truth, tmp_path / "elsewhere" / "meta.mat")
    assert str(error.value) == (
        f"{tmp_path / 'elsewhere' / 'meta.mat'}: devkit meta.mat not found; "
        "pass it with --meta (it sits beside the ground truth in data/)"
    )
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(PrepareError) as error:
        read_devkit_meta(garbage)
    message = str(error.value)
    assert message.startswith(f"{garbage}: not the devkit's meta.mat (")
    assert message.endswith("); pass data/meta.mat of ILSVRC2012_devkit_t12 with --meta")
    missing = tmp_path / "labels.csv"
    with pytest.raises(PrepareError) as error:
        read_val_labels(missing, None)
    assert str(error.value) == (
        f"{missing}: label file not found; "
        "pass LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt"
    )
    upper = write_loc_csv(tmp_path / "SOLUTION.CSV")  # the suffix in capitals is still a CSV
    assert read_val_labels(upper, None)["ILSVRC2012_val_00000002"] == TRUTH[2]


class ReversedListing:
    """os.scandir listing a folder in reverse name order (a file system may list in any order)."""

    def __init__(self, entries):
        self.entries = sorted(entries, key=lambda e: e.name, reverse=True)

    def __iter__(self):
        return iter(self.entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_imagenet_val_counts_each_skip(tmp_path, monkeypatch, capsys):
    flat = flat_val(tmp_path)  # images 1..6, labelled, and LICENSE.txt
    for name in ("README", "a.txt", "zz.txt"):
        (flat / name).write_text("not an image")
    (flat / "ILSVRC2012_val_00000007.JPEG").mkdir()  # a folder with an image's name
    (flat / "ILSVRC2012_val_00000008.JPEG").write_bytes(jpeg(8, 8, seed=8))  # no label
    (flat / "ILSVRC2012_val_00000009.JPEG").write_bytes(jpeg(8, 8, seed=9))  # not an ImageNet-1k class
    (flat / "ILSVRC2012_val_00000010.JPEG").write_bytes(b"")  # empty
    (flat / "ILSVRC2012_val_00000011.JPEG").write_bytes(b"x")  # one byte: not empty, kept
    labels = write_loc_csv(tmp_path / "s.csv")
    with labels.open("a") as fh:
        for i, wnid in ((7, WNIDS[1]), (9, "n99999999"), (10, WNIDS[1]), (11, WNIDS[2]), (13, WNIDS[3])):
            fh.write(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 3 4\n")
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: ReversedListing(list(real_scandir(path))))
    out = tmp_path / "out"
    result = prepare_imagenet_val(flat, labels, out)
    monkeypatch.setattr(os, "scandir", real_scandir)
    err = capsys.readouterr().err
    assert "imagenet-val: 100%" in err and "img/s" in err
    assert result.skipped == {
        "not an ILSVRC2012_val_*.JPEG file": 5,
        "no label in s.csv": 1,
        "label is not one of the 1000 ImageNet-1k WordNet ids": 1,
        "empty file": 1,
    }
    assert result.examples == {  # the first names in name order, whatever order the folder lists them in
        "not an ILSVRC2012_val_*.JPEG file": ["ILSVRC2012_val_00000007.JPEG", "LICENSE.txt", "README"],
        "no label in s.csv": ["ILSVRC2012_val_00000008.JPEG"],
        "label is not one of the 1000 ImageNet-1k WordNet ids": ["ILSVRC2012_val_00000009.JPEG (n99999999)"],
        "empty file": ["ILSVRC2012_val_00000010.JPEG"],
    }
    # kept: 1..6 (5 classes) and 11 (WNIDS[2]); labels without an image file: 7 (a folder) and 13 (absent)
    assert result.counts == {
        "images": 7,
        "classes": 1000,
        "classes_with_images": 6,
        "labels_without_image": 2,
        "links_made": 7,
    }
    assert result.fields == {"zeroshot_images": str(out / "zeroshot")}
    linked = {p.relative_to(out / "zeroshot").as_posix(): os.readlink(p) for p in (out / "zeroshot").glob("*/*")}
    expected = {
        **{f"{wnid}/ILSVRC2012_val_{i:08d}.JPEG": i for i, wnid in TRUTH.items()},
        f"{WNIDS[2]}/ILSVRC2012_val_00000011.JPEG": 11,
    }
    assert linked == {name: str(flat / f"ILSVRC2012_val_{i:08d}.JPEG") for name, i in expected.items()}
    assert sum(1 for p in (out / "zeroshot").iterdir() if p.is_dir()) == 1000
    # a rerun makes no link again and leaves a file that is not its link alone
    keep = out / "zeroshot" / WNIDS[0] / "notes.txt"
    keep.write_text("mine")
    again = prepare_imagenet_val(flat, labels, out, progress=False)
    assert capsys.readouterr().err == ""
    assert again.counts == {**result.counts, "links_made": 0} and keep.read_text() == "mine"


def test_imagenet_val_takes_meta_from_anywhere_and_refuses_unusable_folders(tmp_path):
    flat = flat_val(tmp_path)
    truth = write_devkit(tmp_path / "devkit" / "data")
    elsewhere = tmp_path / "meta"
    elsewhere.mkdir()
    (truth.parent / "meta.mat").rename(elsewhere / "devkit-meta.mat")
    result = prepare_imagenet_val(
        flat, truth, tmp_path / "out", meta=str(elsewhere / "devkit-meta.mat"), progress=False
    )
    assert result.counts["images"] == 6 and result.counts["labels_without_image"] == 1
    with pytest.raises(PrepareError) as error:
        prepare_imagenet_val(tmp_path / "nowhere", truth, tmp_path / "o", progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'nowhere'}: validation image folder not found; pass the flat folder of ILSVRC2012_val_*.JPEG"
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "LICENSE.txt").write_text("no image")
    labels = write_loc_csv(tmp_path / "s.csv")
    with pytest.raises(PrepareError) as error:
        prepare_imagenet_val(bare, labels, tmp_path / "o", progress=False)
    assert str(error.value) == (
        f"{bare}: none of its files has a usable label in {labels} "
        "({'not an ILSVRC2012_val_*.JPEG file': 1}); pass the folder of ILSVRC2012_val_*.JPEG and its label file"
    )


def slice_source(tmp_path: Path) -> Path:
    """Classes by the test's own table: 12, 3, 10 and 11 images; class 20 has 2 usable images (one of one byte)
    beside an empty one, another class's image, a stray file and a folder."""
    root = tmp_path / "train"
    for index, count in ((0, 12), (5, 3), (9, 10), (999, 11)):
        (root / WNIDS[index]).mkdir(parents=True)
        for k in range(count):
            (root / WNIDS[index] / f"{WNIDS[index]}_{100 + k}.JPEG").write_bytes(jpeg(8, 8, seed=k))
    odd = root / WNIDS[20]
    odd.mkdir()
    (odd / f"{WNIDS[20]}_100.JPEG").write_bytes(jpeg(8, 8, seed=1))
    (odd / f"{WNIDS[20]}_101.JPEG").write_bytes(b"x")  # one byte: a file with content
    (odd / f"{WNIDS[20]}_102.JPEG").write_bytes(b"")  # empty: not an image at all
    (odd / "n99999999_1.JPEG").write_bytes(jpeg(8, 8, seed=2))  # another class's name
    (odd / f"{WNIDS[20]}_notes.txt").write_text("notes")
    (odd / f"{WNIDS[20]}_103.JPEG.d").mkdir()  # a folder
    return root


def slice_links(out: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for link in (out / "val_zeroshot").glob("*/*"):
        if link.is_symlink():
            assert os.readlink(link) == str(link.parent.parent.parent.parent / "train" / link.parent.name / link.name)
            found.setdefault(link.parent.name, set()).add(link.name)
    return found


def test_imagenet_train_slice_counts_each_skip_with_its_defaults(tmp_path, capsys):
    src = slice_source(tmp_path)
    out = tmp_path / "out"
    result = prepare_imagenet_train_slice(src, out)  # 10 per class, seed 0, progress shown
    err = capsys.readouterr().err
    assert "imagenet-train-slice: 100%" in err and "1000/1000" in err and "class/s" in err
    links = slice_links(out)
    assert {wnid: len(names) for wnid, names in links.items()} == {
        WNIDS[0]: 10,
        WNIDS[5]: 3,
        WNIDS[9]: 10,
        WNIDS[20]: 2,
        WNIDS[999]: 10,
    }
    assert links[WNIDS[20]] == {f"{WNIDS[20]}_100.JPEG", f"{WNIDS[20]}_101.JPEG"}
    assert links[WNIDS[5]] == {f"{WNIDS[5]}_{100 + k}.JPEG" for k in range(3)}
    assert result.counts == {"images": 35, "classes_with_images": 5, "classes_short_of_per_class": 2, "links_made": 35}
    assert result.skipped == {
        "class folder missing in the train folder": 995,
        "not a <wnid>_N.JPEG file of its class": 2,
    }
    assert result.examples == {
        "class folder missing in the train folder": [WNIDS[1], WNIDS[2], WNIDS[3]],
        "not a <wnid>_N.JPEG file of its class": [
            f"{WNIDS[20]}/{WNIDS[20]}_notes.txt",
            f"{WNIDS[20]}/n99999999_1.JPEG",
        ],
    }
    assert result.fields == {"val_zeroshot_images": str(out / "val_zeroshot")}
    assert sum(1 for p in (out / "val_zeroshot").iterdir() if p.is_dir()) == 1000
    # the defaults are 10 per class and seed 0; seed 1 chooses others
    same = prepare_imagenet_train_slice(src, tmp_path / "same", per_class=10, seed=0, progress=False)
    prepare_imagenet_train_slice(src, tmp_path / "other", per_class=10, seed=1, progress=False)
    assert slice_links(tmp_path / "same") == links != slice_links(tmp_path / "other")
    assert same.counts == result.counts
    # a rerun with another seed into the same folder: the old choice's links go, a file of the user stays
    keep = out / "val_zeroshot" / WNIDS[0] / "notes.txt"
    keep.write_text("mine")
    prepare_imagenet_train_slice(src, out, seed=1, progress=False)
    assert slice_links(out) == slice_links(tmp_path / "other") and keep.read_text() == "mine"
    assert prepare_imagenet_train_slice(src, out, seed=1, progress=False).counts["links_made"] == 0


def test_imagenet_train_slice_refuses_what_it_cannot_use(tmp_path):
    src = slice_source(tmp_path)
    one = prepare_imagenet_train_slice(src, tmp_path / "one", per_class=1, progress=False)
    assert one.counts == {"images": 5, "classes_with_images": 5, "classes_short_of_per_class": 0, "links_made": 5}
    with pytest.raises(PrepareError) as error:
        prepare_imagenet_train_slice(src, tmp_path / "none", per_class=0, progress=False)
    assert str(error.value) == "--per-class 0: give at least 1 image per class"
    with pytest.raises(PrepareError) as error:
        prepare_imagenet_train_slice(tmp_path / "nowhere", tmp_path / "o", progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'nowhere'}: ImageNet train folder not found; "
        "pass the extracted train/ folder (one n######## folder per class)"
    )
    empty = tmp_path / "empty"
    (empty / WNIDS[3]).mkdir(parents=True)  # a class folder without images
    with pytest.raises(PrepareError) as error:
        prepare_imagenet_train_slice(empty, tmp_path / "o", progress=False)
    assert str(error.value) == f"{empty}: no class folder with images; pass the extracted ImageNet train/ folder"


# --------------------------------------------------------------------------- cc3m, every skip

STATS = {
    "00000_stats.json": {"count": 8, "successes": 5, "failed_to_download": 2},
    "00001_stats.json": {"failed_to_download": 3},
}


def meta_json(key: str, status: str = "success") -> bytes:
    return json.dumps({"key": key, "status": status, "url": f"http://example.com/{key}.jpg"}).encode()


def constructed_cc3m(nested: bool) -> dict[str, list[tuple[str, bytes]]]:
    """shard -> members in the order a tar holds them, with one sample of every kind that is skipped."""
    shard0 = [
        (".hidden.jpg", jpeg(8, 8, seed=50)),  # stray: hidden
        ("000000001.jpg", jpeg(40, 30, seed=1)),
        ("000000001.txt", b"  First.  \n"),
        ("000000001.json", meta_json("000000001")),
        ("000000002.json", meta_json("000000002", "failed_to_download")),  # download failed
        ("000000003.json", meta_json("000000003")),  # success, yet no image: no image file
        ("000000003.txt", b"Third."),
        ("000000004.txt", b"Fourth."),  # no image, no metadata
        ("000000005.json", b"{not json"),  # no image, unreadable metadata
        ("000000006.json", b"[1, 2]"),  # no image, metadata not an object
        ("000000007.jpg", jpeg(40, 30, seed=7)),  # no caption
        ("000000007.json", meta_json("000000007")),
        ("000000008.jpg", jpeg(40, 30, seed=8)),
        ("000000008.txt", b" \n\t "),  # blank caption
        ("README", b"hello"),  # stray: no extension
        ("notes.csv", b"a,b"),  # stray: not a member kind
    ]
    shard1 = [
        ("000000009.jpg", b"\xff\xd8 not really a jpeg"),  # does not decode
        ("000000009.txt", b"Ninth."),
        ("000000010.jpg", jpeg(40, 30, seed=10)),
        ("000000010.txt", b"caf\xe9 au lait"),  # not UTF-8: the bad byte replaced
        ("000000011.PNG", png(20, 10)),  # an image by its suffix in any case
        ("000000011.txt", b"Eleventh."),
        ("000000012.jpg", jpeg(40, 30, seed=12)),
        ("000000012.caption.txt", b"Twelfth."),  # WebDataset keys end at the first dot
    ]
    if nested:  # tar members may sit in folders: the folder is part of the key
        shard1 += [("part.1/000000013.jpg", jpeg(16, 16, seed=13)), ("part.1/000000013.txt", b"Nested.")]
    return {"00000": shard0, "00001": shard1}


def write_constructed(root: Path, layout: str, shards=None, stats=STATS) -> Path:
    root.mkdir(parents=True)
    for shard, members in (shards or constructed_cc3m(nested=layout == "webdataset")).items():
        if layout == "files":
            (root / shard).mkdir()
            for name, data in members:
                (root / shard / name).write_bytes(data)
        else:
            with tarfile.open(root / f"{shard}.tar", "w") as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    for name, value in stats.items():
        (root / name).write_text(json.dumps(value))
    return root


CC3M_SKIPPED = {
    "stray member (not an image, .txt or .json of a sample)": 3,
    "download failed (status in .json is not success)": 1,
    "no image file": 4,
    "missing or empty caption (.txt)": 2,
    "image does not decode": 1,
}
CC3M_EXAMPLES = {
    "stray member (not an image, .txt or .json of a sample)": ["00000/.hidden.jpg", "00000/README", "00000/notes.csv"],
    "download failed (status in .json is not success)": ["00000/000000002"],
    "no image file": ["00000/000000003", "00000/000000004", "00000/000000005"],
    "missing or empty caption (.txt)": ["00000/000000007", "00000/000000008"],
    "image does not decode": ["00001/000000009"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_cc3m_counts_every_skip_and_records_its_state(tmp_path, capsys, layout):
    src = write_constructed(tmp_path / "src", layout)
    members = {name: data for shard in constructed_cc3m(nested=True).values() for name, data in shard}
    out = tmp_path / "out"
    result = prepare_cc3m(src, out)  # every sample, progress shown
    err = capsys.readouterr().err
    assert "cc3m: 100%" in err and "img/s" in err
    entries = [
        {"image": "cc3m/00000/000000001.jpg", "caption": "First.", "image_id": 1, "member": "000000001.jpg"},
        {
            "image": "cc3m/00001/000000010.jpg",
            "caption": "caf\ufffd au lait",
            "image_id": 10,
            "member": "000000010.jpg",
        },
        {"image": "cc3m/00001/000000011.png", "caption": "Eleventh.", "image_id": 11, "member": "000000011.PNG"},
        {"image": "cc3m/00001/000000012.jpg", "caption": "Twelfth.", "image_id": 12, "member": "000000012.jpg"},
    ]
    if layout == "webdataset":
        entries.append(
            {
                "image": "cc3m/00001/part.1_000000013.jpg",
                "caption": "Nested.",
                "image_id": "part.1/000000013",
                "member": "part.1/000000013.jpg",
            }
        )
    assert json.loads((out / "train.json").read_text()) == [
        {k: v for k, v in e.items() if k != "member"} for e in entries
    ]
    assert result.skipped == CC3M_SKIPPED and result.examples == CC3M_EXAMPLES
    counts = {
        "layout": layout,
        "samples": 12 + (layout == "webdataset"),
        "pairs": len(entries),
        "reused_from_earlier_run": 0,
        "unused_images_removed": 0,
        "failed_downloads_in_stats_json": 5,
    }
    assert result.counts == counts
    assert result.fields == {"train_ann": str(out / "train.json"), "train_images": str(out / "images")}
    outputs = {}
    for entry in entries:
        written = out / "images" / entry["image"]
        data = members[entry["member"]]
        assert written.read_bytes() == data
        shard = entry["image"].split("/")[1]
        if layout == "files":  # a link to the download
            assert os.readlink(written) == str(src / shard / entry["member"])
            outputs[entry["image"]] = {"source": sha1(data), "link": str(src / shard / entry["member"])}
        else:  # the bytes as stored in the tar
            assert not written.is_symlink()
            outputs[entry["image"]] = {"source": sha1(data), "output": sha1(data)}
    state = {"options": {"version": 1, "max_side": 0, "layout": layout}, "outputs": outputs}
    assert json.loads((out / ".cc3m-state.json").read_text()) == state
    # a rerun reuses every image; twice, so what the first rerun recorded is right too
    for _ in range(2):
        again = prepare_cc3m(src, out, progress=False)
        assert capsys.readouterr().err == ""
        assert again.counts == {**counts, "reused_from_earlier_run": len(entries)}
        assert again.skipped == CC3M_SKIPPED and json.loads((out / ".cc3m-state.json").read_text()) == state
    # what changed under the output is redone: a link replaced by a copy, a written image deleted
    victim = out / "images" / entries[0]["image"]
    if layout == "files":
        victim.unlink()
        victim.write_bytes(members[entries[0]["member"]])
    else:
        victim.unlink()
    third = prepare_cc3m(src, out, progress=False)
    assert third.counts["reused_from_earlier_run"] == len(entries) - 1
    assert victim.read_bytes() == members[entries[0]["member"]] and victim.is_symlink() == (layout == "files")
    assert json.loads((out / ".cc3m-state.json").read_text()) == state


def test_stats_failures_sum_every_readable_stats_file(tmp_path):
    """img2dataset's *_stats.json: failed_to_download summed over the readable ones (a file without the count
    counts 0); unreadable ones are passed over; None when none could be read."""
    files = {
        "bad_stats.json": "{not json",
        "a_stats.json": json.dumps({"failed_to_download": 4}),
        "list_stats.json": "[1]",
        "null_stats.json": json.dumps({"failed_to_download": None}),
        "word_stats.json": json.dumps({"failed_to_download": "many"}),
        "nocount_stats.json": json.dumps({"count": 3}),
        "b_stats.json": json.dumps({"failed_to_download": 2}),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "folder_stats.json").mkdir()

    class Listing:
        """A folder listing its stats files in a given order."""

        def __init__(self, *names):
            self.names = names

        def glob(self, pattern):
            assert pattern == "*_stats.json"
            return [tmp_path / name for name in self.names]

    failures = cc3m_module._stats_failures
    assert (
        failures(Listing("bad_stats.json", "folder_stats.json", "a_stats.json", "list_stats.json", "b_stats.json")) == 6
    )
    assert failures(Listing("null_stats.json", "word_stats.json", "a_stats.json")) == 4
    assert failures(Listing("nocount_stats.json")) == 0  # read, nothing failed
    assert failures(Listing("bad_stats.json", "list_stats.json", "null_stats.json", "folder_stats.json")) is None
    assert failures(Listing()) is None
    assert failures(tmp_path) == 6  # the real folder: every file above


@pytest.mark.timeout(60)
def test_cc3m_without_stats_files_reports_no_failed_downloads(tmp_path):
    src = write_constructed(tmp_path / "src", "files", stats={})
    result = prepare_cc3m(src, tmp_path / "out", progress=False)
    assert "failed_downloads_in_stats_json" not in result.counts and result.counts["pairs"] == 4


def rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("limit", [0, 4])
def test_cc3m_reads_in_chunks_in_shard_order_and_stops_at_the_limit(tmp_path, monkeypatch, limit):
    """Samples go by rank (limit) or by shard and key (no limit), CHUNK at a time; within a chunk they are read
    in shard order; reading stops with the chunk that brings the limit-th usable pair."""
    samples = cc3m_samples()  # 12: no image for FAILED, no caption for NO_CAPTION, BROKEN does not decode
    src = write_webdataset_layout(tmp_path / "src", samples, stray=False)
    monkeypatch.setattr(cc3m_module, "CHUNK", 2)
    reads = []
    real_read = cc3m_module.Source.read

    def read(self, sample, member):
        if member is not None and member.endswith(".txt") or (member is None and sample.image is not None):
            reads.append(sample.key)
        return real_read(self, sample, member)

    monkeypatch.setattr(cc3m_module.Source, "read", read)
    result = prepare_cc3m(src, tmp_path / "out", limit=limit, seed=0, workers=2, progress=False)
    with_image = sorted(k for k in samples if k != FAILED)
    order = sorted(with_image, key=lambda k: rank(0, k)) if limit else with_image
    usable = [k for k in order if k not in (NO_CAPTION, BROKEN)]
    wanted = usable[:limit] if limit else usable
    last = order.index(wanted[-1])  # the chunk holding it is the last one read
    read_keys = order[: (last // 2 + 1) * 2]
    chunks = [read_keys[i : i + 2] for i in range(0, len(read_keys), 2)]
    assert reads == [key for chunk in chunks for key in sorted(chunk)]
    if limit:
        assert any(chunk != sorted(chunk) for chunk in chunks), "no chunk out of shard order: pick another seed"
    entries = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [f"{e['image_id']:09d}" for e in entries] == sorted(wanted)
    assert result.counts["pairs"] == len(wanted) and result.counts["samples"] == 12
    assert result.skipped == {
        "download failed (status in .json is not success)": 1,
        **({"missing or empty caption (.txt)": 1} if NO_CAPTION in read_keys else {}),
        **({"image does not decode": 1} if BROKEN in read_keys else {}),
    }


@pytest.mark.timeout(60)
def test_cc3m_keeps_shard_order_without_a_limit_whatever_the_rank(tmp_path):
    """Two broken images and two blank captions: without a limit they are met (and their examples listed) in
    shard and key order, which here is not their rank order; the tar lists them in neither."""
    keys = [f"{i:09d}" for i in range(20)]
    broken = sorted(
        ((a, b) for a in keys for b in keys if a < b and rank(0, a) > rank(0, b)),
    )[0]
    members = []
    for key in reversed(keys):  # the tar holds them backwards
        image = b"\xff\xd8 broken" if key in broken else jpeg(8, 8, seed=int(key))
        members += [(f"{key}.txt", b"caption"), (f"{key}.jpg", image)]
    src = write_constructed(tmp_path / "src", "webdataset", shards={"00000": members}, stats={})
    result = prepare_cc3m(src, tmp_path / "out", progress=False)
    assert result.skipped == {"image does not decode": 2}
    assert result.examples == {"image does not decode": [f"00000/{broken[0]}", f"00000/{broken[1]}"]}
    assert result.counts["pairs"] == 18


def test_cc3m_max_side_reencodes_what_it_must_and_keeps_what_it_may(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        drafts.append((mode, size))
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    small = jpeg(30, 20, seed=2)
    exact = jpeg(40, 30, seed=3)
    transparent = png(80, 60, mode="RGBA", color=(255, 0, 0, 0))
    shard = {
        "000000001.jpg": jpeg(160, 120, seed=1),  # large: 40 x 30
        "000000002.jpg": small,  # within the limit: kept as it is
        "000000003.jpg": exact,  # exactly at the limit: kept as it is
        "000000004.png": png(20, 10),  # small, but not a JPEG: re-encoded, same size
        "000000005.jpg": gray_jpeg(20, 20),  # small, but grey: re-encoded in RGB, same size
        "000000006.png": transparent,  # transparent: on white
        "000000007.jpg": jpeg(200, 2, seed=7),  # a sliver: never thinner than 1 pixel
    }
    members = [(name, data) for name, data in shard.items()]
    members += [(name.split(".")[0] + ".txt", b"caption") for name in shard]
    src = write_constructed(tmp_path / "src", "files", shards={"00000": members}, stats={})
    out = tmp_path / "out"
    result = prepare_cc3m(src, out, max_side=40, progress=False)
    assert result.skipped == {} and result.counts["pairs"] == 7
    images = out / "images" / "cc3m" / "00000"
    assert sorted(p.name for p in images.iterdir()) == [f"00000000{i}.jpg" for i in range(1, 8)]
    reference = io.BytesIO()
    Image.new("RGB", (16, 16)).save(reference, "JPEG", quality=95)
    quality_95 = Image.open(reference).quantization
    expected = {1: (40, 30), 4: (20, 10), 5: (20, 20), 6: (40, 30), 7: (40, 1)}
    for i, size in expected.items():
        with Image.open(images / f"00000000{i}.jpg") as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size), i
            assert image.quantization == quality_95, i
    assert (images / "000000002.jpg").read_bytes() == small and (images / "000000003.jpg").read_bytes() == exact
    with Image.open(images / "000000006.jpg") as image:
        assert np.asarray(image).min() >= 250  # white where it was transparent
    # JPEGs are decoded at a reduced scale that still covers the target (the grey one: to twice its size)
    assert sorted(drafts) == [("RGB", (40, 1)), ("RGB", (40, 30)), ("RGB", (40, 40))]
    state = json.loads((out / ".cc3m-state.json").read_text())
    assert state["options"] == {"version": 1, "max_side": 40, "layout": "files"}
    # another --max-side reuses nothing of the first
    again = prepare_cc3m(src, out, max_side=20, progress=False)
    assert again.counts["reused_from_earlier_run"] == 0
    with Image.open(images / "000000001.jpg") as image:
        assert image.size == (20, 15)


@pytest.mark.timeout(60)
def test_cc3m_state_without_outputs_and_a_smaller_limit(tmp_path):
    src = write_webdataset_layout(tmp_path / "src", cc3m_samples(), stray=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cc3m-state.json").write_text(
        json.dumps({"options": {"version": 1, "max_side": 20, "layout": "webdataset"}})
    )
    first = prepare_cc3m(src, out, max_side=20, progress=False)
    assert first.counts["reused_from_earlier_run"] == 0 and first.counts["pairs"] == 9
    smaller = prepare_cc3m(src, out, max_side=20, limit=3, progress=False)
    assert smaller.counts["unused_images_removed"] == 6 and smaller.counts["pairs"] == 3
    assert len(list((out / "images").rglob("*.jpg"))) == 3
    assert len(json.loads((out / ".cc3m-state.json").read_text())["outputs"]) == 3


def test_cc3m_defaults_take_every_sample_in_full_size(tmp_path):
    src = write_files_layout(tmp_path / "src", cc3m_samples())
    result = prepare_cc3m(src, tmp_path / "out", progress=False)  # no limit, no resizing
    assert result.counts["pairs"] == 9
    assert os.path.islink(tmp_path / "out" / "images" / "cc3m" / "00000" / "000000000.jpg")
    seeded = prepare_cc3m(src, tmp_path / "seeded", limit=4, progress=False)  # seed 0 by default
    chosen = [f"{e['image_id']:09d}" for e in json.loads((tmp_path / "seeded" / "train.json").read_text())]
    assert chosen == expected_subset(GOOD, 0, 4) and seeded.counts["pairs"] == 4


def test_cc3m_refuses_what_it_cannot_use(tmp_path):
    def refused(src, out=None, **options) -> str:
        with pytest.raises(PrepareError) as error:
            prepare_cc3m(src, out or tmp_path / "out", progress=False, **options)
        return str(error.value)

    missing = tmp_path / "missing"
    assert (
        refused(missing) == f"{missing}: img2dataset output folder not found; pass the --output_folder of img2dataset"
    )
    src = write_files_layout(tmp_path / "src", cc3m_samples(3))
    (tmp_path / "a-file").write_text("")
    assert refused(tmp_path / "a-file").startswith(f"{tmp_path / 'a-file'}: img2dataset output folder not found")
    assert refused(src, limit=-1) == "--limit and --max-side must be >= 0 (got -1, 0)"
    assert refused(src, max_side=-2) == "--limit and --max-side must be >= 0 (got 0, -2)"
    assert refused(src, src) == f"{src}: --out lies inside --src {src}; choose a folder outside the download"
    inside = src / "00000" / "out"
    assert refused(src, inside) == f"{inside}: --out lies inside --src {src}; choose a folder outside the download"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "00000_stats.json").write_text("{}")
    assert refused(empty) == (
        f"{empty}: no shard folders (00000/) or tar shards (00000.tar); pass the "
        "--output_folder of img2dataset (output_format files or webdataset)"
    )
    broken_tar = tmp_path / "broken-tar"
    broken_tar.mkdir()
    (broken_tar / "00000.tar").write_bytes(b"this is not a tar file" * 40)
    message = refused(broken_tar)
    assert message.startswith(f"{broken_tar / '00000.tar'}: not a readable tar shard (")
    assert message.endswith("); re-download that shard or move it out of the folder")
    unusable = write_constructed(
        tmp_path / "unusable", "files", shards={"00000": [("1.jpg", b"broken"), ("1.txt", b"caption")]}, stats={}
    )
    assert refused(unusable) == (
        f"{unusable}: no usable sample ({{'image does not decode': 1}}); check that it is an img2dataset "
        "output folder with images and captions"
    )
