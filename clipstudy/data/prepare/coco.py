"""COCO Karpathy splits: ``dataset_coco.json`` -> ``retrieval.json`` (test), ``val_retrieval.json`` (val),
and a link to the COCO images."""

from __future__ import annotations

from pathlib import Path

from clipstudy.data.prepare.common import (
    Prepared,
    PrepareError,
    ensure_link,
    progress_bar,
    read_json,
    require_path,
    write_json_if_changed,
)

# Karpathy's split -> (file it is written to, the field naming it): test is what the study reports,
# val is what per-epoch evaluation and tuning read (the original code evaluated on val: docs/protocol.md)
SPLITS = {"test": ("retrieval.json", "retrieval_ann"), "val": ("val_retrieval.json", "val_retrieval_ann")}


def prepare_coco_karpathy(src: str | Path, images: str | Path, out: str | Path, progress: bool = True) -> Prepared:
    """The test and validation retrieval sets from Karpathy's split file (5k images each), captions in file order.

    Images stay where they are: ``OUT/images/coco`` links to ``images`` (the
    COCO root holding ``val2014/``), and each entry's path is
    ``coco/<filepath>/<filename>``. Images whose file is missing or empty and
    images without a caption are skipped and counted (reasons prefixed by the split).
    """
    src, images, out = Path(src), Path(images), Path(out).absolute()
    fix = "pass Karpathy's dataset_coco.json (from caption_datasets.zip)"
    data = read_json(require_path(src, "split file", fix), "Karpathy split file dataset_coco.json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepareError(f"{src}: no 'images' list at the top level; {fix}")
    require_path(images, "COCO image root", "pass the folder that holds val2014/ (and train2014/)", folder=True)
    for i, item in enumerate(data["images"]):
        if not isinstance(item, dict) or not {"filepath", "filename", "split", "sentences"} <= item.keys():
            raise PrepareError(f"{src}: images[{i}] lacks filepath/filename/split/sentences; {fix}")
    fields = {"retrieval_images": str(out / "images"), "val_retrieval_images": str(out / "images")}
    result = Prepared(fields={**{field: str(out / name) for name, field in SPLITS.values()}, **fields})
    chosen = {split: _split_entries(data["images"], split, images, result, progress) for split in SPLITS}
    for split, entries in chosen.items():
        if not entries:
            raise PrepareError(
                f"{src}: no usable image of split {split!r} ({sum(result.skipped.values())} skipped: "
                f"{dict(result.skipped)}); check the file and that --images holds val2014/"
            )
    ensure_link(out / "images" / "coco", images)
    for split, entries in chosen.items():
        write_json_if_changed(out / SPLITS[split][0], entries)
        result.counts[f"{split}_images"] = len(entries)
        result.counts[f"{split}_captions"] = sum(len(e["caption"]) for e in entries)
    return result


def _split_entries(items: list, split: str, images: Path, result: Prepared, progress: bool) -> list[dict]:
    entries = []
    for i, item in enumerate(progress_bar(items, desc=f"coco-karpathy {split}", unit="img", progress=progress)):
        if item["split"] != split:
            continue
        relative = f"{item['filepath']}/{item['filename']}"
        captions = [s.get("raw", "") for s in item["sentences"] if isinstance(s, dict)]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            result.skip(f"{split}: no caption", relative)
            continue
        try:
            size = (images / relative).stat().st_size
        except OSError:
            size = -1
        if size <= 0:
            result.skip(f"{split}: image file missing or empty under the COCO root", relative)
            continue
        entries.append({"image": f"coco/{relative}", "caption": captions, "image_id": item.get("cocoid", i)})
    return entries
