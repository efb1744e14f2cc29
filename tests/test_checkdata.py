"""check-data: counts, unreadable files, caption summaries, exit status, JSON output."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import TINY_DEMO
from PIL import Image

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.data.check import check_data


def write_pairs(root, entries, good, bad_text=(), kind="train"):
    """Annotation file + images: ``good`` names get real PNGs, ``bad_text`` names get text files."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in good:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(images / name)
    for name in bad_text:
        (images / name).write_text("not an image")
    ann = root / f"{kind}.json"
    ann.write_text(json.dumps(entries))
    return ann, images


def test_demo_set_counts_and_exit_zero(demo_data_dir, capsys):
    report = check_data(data=str(demo_data_dir))
    assert report["ok"] is True
    assert report["train"]["entries"] == report["train"]["readable_images"] == TINY_DEMO["train_size"]
    assert report["retrieval"]["entries"] == TINY_DEMO["retrieval_size"]
    assert report["retrieval"]["texts"] == 5 * TINY_DEMO["retrieval_size"]
    assert report["retrieval"]["captions_per_image"] == {"min": 5, "mean": 5.0, "max": 5}
    per_class = TINY_DEMO["zeroshot_per_class"]
    assert report["zeroshot"]["classes"] == TINY_DEMO["zeroshot_classes"]
    assert report["zeroshot"]["images_per_class"] == {"min": per_class, "max": per_class}
    assert report["zeroshot"]["empty_classes"] == [] and report["zeroshot"]["classnames_file"] is True
    assert clipstudy_main(["check-data", "--data", str(demo_data_dir)]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "[zeroshot]" in out and out.rstrip().endswith("OK")


def test_caption_summary_by_hand(tmp_path):
    captions = ["A b c", "Hello, world!", "!!!", "One two three four five"]  # 3, 2, 0, 5 words
    entries = [{"image": f"{i}.png", "caption": c, "image_id": i} for i, c in enumerate(captions)]
    ann, images = write_pairs(tmp_path, entries, [f"{i}.png" for i in range(4)])
    words = check_data(train_ann=str(ann), train_images=str(images))["train"]["captions"]
    assert words == {
        "count": 4,
        "min_words": 0,
        "mean_words": 2.5,
        "median_words": statistics.median([3, 2, 0, 5]),
        "max_words": 5,
        "empty_after_cleaning": 1,
    }
    capped = check_data(train_ann=str(ann), train_images=str(images), max_words=3)["train"]["captions"]
    assert capped["max_words"] == 3


def test_unreadable_files_listed_in_json(tmp_path, capsys):
    entries = [
        {"image": "ok.png", "caption": ["a", "b"]},
        {"image": "gone.png", "caption": ["c"]},
        {"image": "text.png", "caption": "d"},
    ]
    ann, images = write_pairs(tmp_path, entries, ["ok.png"], ["text.png"], kind="retrieval")
    assert (
        clipstudy_main(
            [
                "check-data",
                "--retrieval-ann",
                str(ann),
                "--retrieval-images",
                str(images),
                "--json",
                "--max-unreadable",
                "1",
            ]
        )
        == 0
    )  # 2 of 3 unreadable: allowed here, to see the listing
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    section = report["retrieval"]
    assert section["entries"] == 3 and section["readable_images"] == 1 and section["texts"] == 4
    assert section["captions_per_image"] == {"min": 1, "mean": 1.33, "max": 2}
    key = next(k for k in section if "unreadable" in k)
    assert {(item["path"].split("/")[-1], "not found" in item["reason"]) for item in section[key]} == {
        ("gone.png", True),
        ("text.png", False),
    }


def test_set_without_usable_image_exits_one(tmp_path, capsys):
    entries = [{"image": "a.png", "caption": "x", "image_id": 0}, {"image": "b.png", "caption": "y", "image_id": 1}]
    ann, images = write_pairs(tmp_path, entries, [], ["a.png"])
    assert clipstudy_main(["check-data", "--train-ann", str(ann), "--train-images", str(images)]) == 1
    out = capsys.readouterr().out
    assert "NOT USABLE" in out and "a.png" in out and "b.png" in out
    empty_ann = tmp_path / "empty.json"
    empty_ann.write_text("[]")
    assert clipstudy_main(["check-data", "--train-ann", str(empty_ann), "--train-images", str(images)]) == 1


def test_zeroshot_empty_class_folders(tmp_path):
    root = tmp_path / "zs"
    for name, n in (("cat", 2), ("dog", 0), ("emu", 1)):
        (root / name).mkdir(parents=True)
        for k in range(n):
            Image.new("L", (8, 8), 9).save(root / name / f"{k}.png")
    section = check_data(zeroshot_images=str(root))["zeroshot"]
    assert section["classes"] == 3 and section["images"] == 3
    assert section["images_per_class"] == {"min": 0, "max": 2} and section["empty_classes"] == ["dog"]
    assert section["classnames_file"] is False and section["usable"] is True


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "nothing to check: give --train-ann/--train-images"),
        (["--train-ann", "x.json"], "--train-ann and --train-images go together"),
        (["--retrieval-images", "somewhere"], "--retrieval-ann and --retrieval-images go together"),
        (["--no-such-option"], "unknown option --no-such-option"),
    ],
)
def test_usage_errors_exit_two_naming_the_problem(args, says, capsys):
    assert clipstudy_main(["check-data", *args]) == 2
    captured = capsys.readouterr()
    assert says in captured.err.splitlines()[-1] and captured.out == ""


def test_malformed_annotation_exits_two_naming_the_file(tmp_path, capsys):
    ann = tmp_path / "broken.json"
    ann.write_text("[{]")
    (tmp_path / "images").mkdir()
    assert clipstudy_main(["check-data", "--train-ann", str(ann), "--train-images", str(tmp_path / "images")]) == 2
    assert str(ann) in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"image": "a.png", "caption": "x", "image_id": 0}]))
    assert (
        clipstudy_main(["check-data", "--train-ann", str(good), "--train-images", str(tmp_path / "missing_dir")]) == 2
    )
    assert "missing_dir" in capsys.readouterr().err


def test_too_many_unreadable_images_fail_naming_the_threshold(tmp_path, capsys):
    # issue 15 case 8: 12 of 50 images unreadable (24%) passed as OK with exit 0
    names = [f"{i}.png" for i in range(50)]
    entries = [{"image": n, "caption": "x", "image_id": i} for i, n in enumerate(names)]
    ann, images = write_pairs(tmp_path, entries, names[12:], names[:12])
    args = ["--train-ann", str(ann), "--train-images", str(images)]
    assert clipstudy_main(["check-data", *args]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == ("FAILED: train set has 12 of 50 images unreadable (24.0%), above --max-unreadable 0.01 (1%)")
    assert clipstudy_main(["check-data", *args, "--max-unreadable", "0.25"]) == 0  # 24% is within a 25% threshold
    assert capsys.readouterr().out.rstrip().endswith("OK")
    # exactly at the threshold passes; one more image over it fails
    assert check_data(train_ann=str(ann), train_images=str(images), max_unreadable=0.24)["ok"]
    assert not check_data(train_ann=str(ann), train_images=str(images), max_unreadable=0.23)["ok"]
    assert clipstudy_main(["check-data", *args, "--max-unreadable", "2"]) == 2


def test_mostly_missing_images_name_the_root_to_check(tmp_path, capsys):
    names = [f"{i}.png" for i in range(10)]
    entries = [{"image": n, "caption": "x", "image_id": i} for i, n in enumerate(names)]
    ann, images = write_pairs(tmp_path, entries, names[:2])  # 8 of 10 files absent
    assert clipstudy_main(["check-data", "--train-ann", str(ann), "--train-images", str(images)]) == 1
    out = capsys.readouterr().out
    assert f"8 of 10 images are missing: check the image root {images}" in out
    ann2, images2 = write_pairs(tmp_path / "few", entries, names[:8])  # 2 of 10 absent: no such hint
    clipstudy_main(["check-data", "--train-ann", str(ann2), "--train-images", str(images2)])
    assert "check the image root" not in capsys.readouterr().out
