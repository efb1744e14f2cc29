"""COCO Karpathy splits: ``dataset_coco.json`` -> ``retrieval.json`` + a link to the COCO images."""

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


def prepare_coco_karpathy(
    src: str | Path, images: str | Path, out: str | Path, split: str = "test", progress: bool = True
) -> Prepared:
    """The retrieval set from Karpathy's split file: the ``split`` images, captions in file order.

    Images stay where they are: ``OUT/images/coco`` links to ``images`` (the
    COCO root holding ``val2014/``), and each entry's path is
    ``coco/<filepath>/<filename>``. Images whose file is missing or empty and
    images without a caption are skipped and counted.
    """
    src, images, out = Path(src), Path(images), Path(out).absolute()
    fix = "pass Karpathy's dataset_coco.json (from caption_datasets.zip)"
    data = read_json(require_path(src, "split file", fix), "Karpathy split file dataset_coco.json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepareError(f"{src}: no 'images' list at the top level; {fix}")
    require_path(images, "COCO image root", "pass the folder that holds val2014/ (and train2014/)", folder=True)
    result = Prepared(fields={"retrieval_ann": str(out / "retrieval.json"), "retrieval_images": str(out / "images")})
    entries = []
    for i, item in enumerate(progress_bar(data["images"], desc="coco-karpathy", unit="img", progress=progress)):
        if not isinstance(item, dict) or not {"filepath", "filename", "split", "sentences"} <= item.keys():
            raise PrepareError(f"{src}: images[{i}] lacks filepath/filename/split/sentences; {fix}")
        if item["split"] != split:
            continue
        relative = f"{item['filepath']}/{item['filename']}"
        captions = [s.get("raw", "") for s in item["sentences"] if isinstance(s, dict)]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            result.skip("no caption", relative)
            continue
        try:
            size = (images / relative).stat().st_size
        except OSError:
            size = -1
        if size <= 0:
            result.skip("image file missing or empty under the COCO root", relative)
            continue
        entries.append({"image": f"coco/{relative}", "caption": captions, "image_id": item.get("cocoid", i)})
    if not entries:
        raise PrepareError(
            f"{src}: no usable image of split {split!r} ({sum(result.skipped.values())} skipped: "
            f"{dict(result.skipped)}); check the file and that --images holds val2014/"
        )
    ensure_link(out / "images" / "coco", images)
    write_json_if_changed(out / "retrieval.json", entries)
    result.counts = {"images": len(entries), "captions": sum(len(e["caption"]) for e in entries)}
    return result


# --------------------------------------------------------------------------- imagenet-val
