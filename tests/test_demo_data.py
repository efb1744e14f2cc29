"""The embedded demo benchmark: layout, determinism, balance, captions that match the pixels."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DEMO
from PIL import Image

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.data.datasets import RetrievalSet, TrainPairs, clean_caption, eval_transform
from clipstudy.data.demo import COLOURS, POSITIONS, SHAPES, SIZES, content_digest, main, make_demo_data
from clipstudy.data.layout import layout
from clipstudy.data.zeroshot import ZeroShotSet

# Palette and words as the test reads them (the generator's tables, inverted).
PALETTE = {name: np.array(rgb, dtype=float) for name, (rgb, _) in COLOURS.items()}
COLOUR_OF_WORD = {word: name for name, (_, words) in COLOURS.items() for word in words}
CELL_OF_PHRASE = {phrase: cell for cell, phrases in POSITIONS.items() for phrase in phrases}
SIZE_OF_WORD = {word: size for size, words in SIZES.items() for word in words}


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_and_formats(demo_data_dir):
    paths = layout(demo_data_dir)
    for key in ("train_ann", "retrieval_ann", "manifest", "scenes"):
        assert paths[key].is_file(), key
    train = TrainPairs(paths["train_ann"], paths["train_images"], eval_transform(32))
    assert len(train) == TINY_DEMO["train_size"]
    assert train.images[0] == "train/000000.png" and train.image_ids == list(range(len(train)))
    retrieval = RetrievalSet(paths["retrieval_ann"], paths["retrieval_images"], eval_transform(32))
    assert len(retrieval) == TINY_DEMO["retrieval_size"] and retrieval.images[0] == "retrieval/000000.png"
    zeroshot = ZeroShotSet(paths["zeroshot_images"], eval_transform(32))
    assert len(zeroshot.classes) == TINY_DEMO["zeroshot_classes"]
    assert zeroshot.classnames == [c.replace("_", " ") for c in zeroshot.classes]
    assert all(t.count("{}") == 1 for t in zeroshot.templates)
    assert Image.open(demo_data_dir / "images" / train.images[0]).size == (32, 32)
    assert train[0][0].shape == (3, 32, 32) and zeroshot[0][0].shape == (3, 32, 32)
    # the validation split: drawn like the test split, as large, from its own stream
    val_retrieval = RetrievalSet(paths["val_retrieval_ann"], paths["val_retrieval_images"], eval_transform(32))
    val_zeroshot = ZeroShotSet(paths["val_zeroshot_images"], eval_transform(32))
    assert len(val_retrieval) == len(retrieval) and val_retrieval.images[0] == "val_retrieval/000000.png"
    assert val_zeroshot.classes == zeroshot.classes and len(val_zeroshot) == len(zeroshot)
    assert val_retrieval.texts != retrieval.texts


def test_zeroshot_is_balanced(demo_data_dir):
    root = demo_data_dir / "zeroshot"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(folders) == TINY_DEMO["zeroshot_classes"]
    assert len({f.split("_")[0] for f in folders}) > 1  # a small subset still mixes colours
    for folder in folders:
        assert len(list((root / folder).glob("*.png"))) == TINY_DEMO["zeroshot_per_class"]
    names = json.loads((root / "classnames.json").read_text())["classnames"]
    assert sorted(names) == folders


def test_retrieval_has_five_different_captions(demo_data_dir):
    for entry in json.loads((demo_data_dir / "retrieval.json").read_text()):
        cleaned = [clean_caption(c) for c in entry["caption"]]
        assert len(cleaned) == 5 and len(set(cleaned)) == 5, entry


def test_manifest_counts_and_chance_levels(demo_data_dir):
    manifest = json.loads((demo_data_dir / "manifest.json").read_text())
    retrieval = json.loads((demo_data_dir / "retrieval.json").read_text())
    n_images, n_texts = len(retrieval), sum(len(e["caption"]) for e in retrieval)
    n_classes = TINY_DEMO["zeroshot_classes"]
    assert manifest["counts"]["retrieval_texts"] == n_texts
    assert manifest["counts"]["zeroshot_images"] == n_classes * TINY_DEMO["zeroshot_per_class"]
    # 5 of n_texts captions belong to each image: TR@1 chance 5 / n_texts, IR@1 1 / n_images
    assert manifest["chance"]["txt_r1"] == pytest.approx(100 * 5 / n_texts)
    assert manifest["chance"]["img_r1"] == pytest.approx(100 / n_images)
    assert manifest["chance"]["zeroshot_top1"] == pytest.approx(100 / n_classes)
    assert {k: manifest["parameters"][k] for k in TINY_DEMO} == TINY_DEMO


# --------------------------------------------------------------------------- pixels vs captions


def shape_pixels(path: Path):
    """Independent reading of a one-shape image: (colour name, centre (x, y) as fractions, area fraction)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=2)
    core = distance > 0.6 * distance.max()
    colour = min(PALETTE, key=lambda name: np.linalg.norm(pixels[core].mean(axis=0) - PALETTE[name]))
    covered = distance > 0.5 * distance.max()
    ys, xs = np.nonzero(covered)
    side = pixels.shape[0]
    return colour, ((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side), covered.mean()


def nearest_cell(centre):
    x, y = centre
    centres = (0.22, 0.5, 0.78)
    return (int(np.argmin([abs(y - c) for c in centres])), int(np.argmin([abs(x - c) for c in centres])))


def words_in(caption: str, table: dict) -> list:
    """Values of the table's phrases found in the caption, longest phrases first, without overlaps."""
    text, found = f" {clean_caption(caption)} ", []
    for phrase in sorted(table, key=len, reverse=True):
        key = f" {clean_caption(phrase)} "
        if key in text:
            found.append(table[phrase])
            text = text.replace(key, " | ")
    return found


def test_single_shape_captions_match_the_pixels(demo_data_dir):
    scenes = json.loads((demo_data_dir / "scenes.json").read_text())
    train = {e["image"]: [e["caption"]] for e in json.loads((demo_data_dir / "train.json").read_text())}
    retrieval = {e["image"]: e["caption"] for e in json.loads((demo_data_dir / "retrieval.json").read_text())}
    checked = positions = sizes = 0
    for scene in scenes["train"] + scenes["retrieval"]:
        if len(scene["shapes"]) != 1:
            continue
        colour, centre, area = shape_pixels(demo_data_dir / "images" / scene["image"])
        size = "large" if area > 0.053 else "small"  # small shapes cover < 3.8 %, large > 7.1 % of the image
        for caption in train.get(scene["image"]) or retrieval[scene["image"]]:
            assert words_in(caption, COLOUR_OF_WORD) == [colour], caption
            cells = words_in(caption, CELL_OF_PHRASE)
            if cells:
                assert cells == [nearest_cell(centre)], (caption, centre)
                positions += 1
            size_words = words_in(caption, SIZE_OF_WORD)
            if size_words:
                assert size_words == [size], (caption, area)
                sizes += 1
            checked += 1
    assert checked > 30 and positions > 10 and sizes > 10


def test_zeroshot_images_show_their_class_colour(demo_data_dir):
    root = demo_data_dir / "zeroshot"
    for path in sorted(root.glob("*/*.png")):
        assert shape_pixels(path)[0] == path.parent.name.split("_")[0], path


def test_two_shape_captions_name_both_colours(demo_data_dir):
    scenes = {s["image"]: s for s in json.loads((demo_data_dir / "scenes.json").read_text())["retrieval"]}
    pairs = 0
    for entry in json.loads((demo_data_dir / "retrieval.json").read_text()):
        shapes = scenes[entry["image"]]["shapes"]
        if len(shapes) == 2:
            pairs += 1
            for caption in entry["caption"]:
                assert sorted(words_in(caption, COLOUR_OF_WORD)) == sorted(s["colour"] for s in shapes), caption
    assert pairs > 0


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_knows_the_training_captions_only(demo_data_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_data_dir / "tokenizer"))
    assert tokenizer.pad_token_id == 0 and len(tokenizer) < 400
    train_words = set()
    for entry in json.loads((demo_data_dir / "train.json").read_text()):
        text = clean_caption(entry["caption"])
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        assert tokens[1:-1] == text.split()  # every training word is one known token
        train_words.update(text.split())
    # the out-of-vocabulary path: a prompt word no training caption has is split into known character
    # pieces (never [UNK]) that decode back to the word; a character the corpus never had is [UNK]
    classes = json.loads((demo_data_dir / "zeroshot" / "classnames.json").read_text())
    prompt_words = {w for t in classes["templates"] for w in clean_caption(t.format("x")).split()} - {"x"}
    unseen = sorted(prompt_words - train_words)
    assert "photo" in unseen  # a template word, absent from the training grammar
    for word in unseen:
        pieces = tokenizer.tokenize(word)
        assert len(pieces) > 1 and "[UNK]" not in pieces and tokenizer.convert_tokens_to_string(pieces) == word
        assert word not in tokenizer.get_vocab()
    assert tokenizer.tokenize("€") == ["[UNK]"]


def test_zeroshot_classes_are_held_out_from_training_and_retrieval(demo_data_dir):
    """The zero-shot classes are colour x shape combinations that no training or retrieval image or caption
    shows, while every colour and shape of them does appear in training (with other partners)."""
    colour_words = {c: words for c, (_, words) in COLOURS.items()}
    classes = json.loads((demo_data_dir / "zeroshot" / "classnames.json").read_text())["classnames"]
    held = {tuple(class_id.split("_")) for class_id in classes}
    val_classes = json.loads((demo_data_dir / "val_zeroshot" / "classnames.json").read_text())["classnames"]
    assert val_classes == classes and len(held) == TINY_DEMO["zeroshot_classes"]
    scenes = json.loads((demo_data_dir / "scenes.json").read_text())
    seen = {
        (s["colour"], s["shape"])
        for split in ("train", "retrieval", "val_retrieval")
        for sc in scenes[split]
        for s in sc["shapes"]
    }
    assert not seen & held
    assert {c for c, _ in held} <= {c for c, _ in seen} and {s for _, s in held} <= {s for _, s in seen}
    captions = [e["caption"] for e in json.loads((demo_data_dir / "train.json").read_text())]
    for name in ("retrieval.json", "val_retrieval.json"):
        captions += [c for e in json.loads((demo_data_dir / name).read_text()) for c in e["caption"]]
    for colour, shape in held:  # no caption names a held-out class, with any synonym
        for cw in colour_words[colour]:
            for sw in SHAPES[shape]:
                assert not any(f"{cw} {sw}" in caption for caption in captions), (cw, sw)
    manifest = json.loads((demo_data_dir / "manifest.json").read_text())
    zero = {"combination": 0, "configuration": 0}
    assert manifest["zeroshot_overlap_with_train"] == {"zeroshot": zero, "val_zeroshot": zero}


def test_overlap_counts_find_a_planted_overlap():
    from clipstudy.data.demo_scenes import overlap_counts

    background = {"tone": "dark"}
    shape = dict(colour="red", shape="circle", size="small", row=0, col=0)
    evaluation = [{"background": background, "shapes": [shape]}]
    other_cell = {"background": background, "shapes": [{**shape, "col": 2}]}
    other_kind = {"background": background, "shapes": [{**shape, "shape": "square"}]}
    assert overlap_counts(evaluation, [other_kind]) == {"combination": 0, "configuration": 0}
    assert overlap_counts(evaluation, [other_kind, other_cell]) == {"combination": 1, "configuration": 0}
    assert overlap_counts(evaluation, [evaluation[0]]) == {"combination": 1, "configuration": 1}


# --------------------------------------------------------------------------- determinism and reuse


def test_same_seed_gives_identical_bytes_in_a_fresh_process(demo_data_dir, tmp_path):
    """A second process (other hash seeds) writes the same files; its tokenizer loads offline."""
    out = tmp_path / "again"
    script = (
        "import json, sys\n"
        "from clipstudy.data.demo import make_demo_data\n"
        f"make_demo_data(sys.argv[1], **{TINY_DEMO!r})\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1] + '/tokenizer')\n"
        "print(json.dumps(tok('a small red circle in the top left')['input_ids']))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    files = all_files(demo_data_dir)
    assert files == all_files(out)
    _, mismatch, errors = filecmp.cmpfiles(demo_data_dir, out, files, shallow=False)
    assert not mismatch and not errors
    from transformers import AutoTokenizer

    here = AutoTokenizer.from_pretrained(str(demo_data_dir / "tokenizer"))("a small red circle in the top left")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == here["input_ids"]


def test_different_seed_gives_different_data(demo_data_dir, tmp_path):
    make_demo_data(tmp_path, **{**TINY_DEMO, "seed": 1})
    assert (tmp_path / "train.json").read_bytes() != (demo_data_dir / "train.json").read_bytes()
    assert (tmp_path / "images/train/000000.png").read_bytes() != (
        demo_data_dir / "images/train/000000.png"
    ).read_bytes()


def test_complete_set_is_reused_and_a_damaged_one_rebuilt(demo_data_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(demo_data_dir, copy)
    args = [
        "--out",
        str(copy),
        "--seed",
        "0",
        "--image-size",
        "32",
        "--train-size",
        "64",
        "--retrieval-size",
        "16",
        "--zeroshot-per-class",
        "3",
        "--zeroshot-classes",
        "4",
    ]
    image = copy / "images/train/000005.png"
    before = image.stat().st_mtime_ns
    assert main(args) == 0
    assert "not regenerating" in capsys.readouterr().out and image.stat().st_mtime_ns == before
    image.unlink()
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert image.read_bytes() == (demo_data_dir / "images/train/000005.png").read_bytes()
    assert content_digest(copy) == content_digest(demo_data_dir)
    assert clipstudy_main(["make-demo-data", *args[:-2], "--zeroshot-classes", "1"]) == 2  # bad parameter
    assert "zeroshot_classes must be between 2" in capsys.readouterr().err
