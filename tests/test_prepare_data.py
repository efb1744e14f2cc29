"""prepare-data: miniature downloads in each layout -> the study's formats, counted skips, reruns."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.data.check import check_data
from clipstudy.data.datasets import eval_transform
from clipstudy.data.prepare.cc3m import prepare_cc3m
from clipstudy.data.prepare.coco import prepare_coco_karpathy
from clipstudy.data.prepare.common import PrepareError
from clipstudy.data.prepare.imagenet import prepare_imagenet_train_slice, prepare_imagenet_val
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
