"""``prepare-data cc3m``: img2dataset output -> the study's training pairs (see :mod:`clipstudy.data.prepare.command`).

img2dataset writes each sample as ``KEY.jpg`` (the image), ``KEY.txt`` (the
caption) and ``KEY.json`` (metadata with a ``status``), either as files in
shard folders (``--output_format files``: ``00000/KEY.jpg``, ...) or as
members of tar shards (``--output_format webdataset``: ``00000.tar``, ...),
with ``*_stats.json`` per shard beside them.

Output: ``OUT/train.json`` (``{"image": "cc3m/<shard>/<key>.jpg", "caption",
"image_id"}``) and the images under ``OUT/images/cc3m/``: with ``--max-side``
re-encoded JPEGs whose longer side is at most that; without it, links to the
downloaded files (``files`` layout) or the image bytes as stored (tar shards).
Every image is decoded once on the way; samples whose download failed, whose
caption is missing or empty, or whose image does not decode are skipped and
counted. ``OUT/.cc3m-state.json`` records a digest of each source image and
of each written file, so a rerun skips the decoding of what is unchanged.

``--limit N --seed S`` keeps N usable pairs: samples are taken in the order of
``sha256(f"{S}:{KEY}")``, which depends only on the keys, so the subset is the
same for both layouts, any shard order and any number of threads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipstudy.data.prepare.common import (
    Prepared,
    PrepareError,
    ensure_link,
    progress_bar,
    require_path,
    write_json_if_changed,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
STATE_FILE = ".cc3m-state.json"
STATE_VERSION = 1
JPEG_QUALITY = 95
CHUNK = 256  # samples read per round: bounds the memory held by image bytes


@dataclass
class Sample:
    """One img2dataset sample; members are file paths (files layout) or tar member names."""

    shard: str
    key: str
    image: str | None = None
    caption: str | None = None
    meta: str | None = None

    def rank(self, seed: int) -> str:
        return hashlib.sha256(f"{seed}:{self.key}".encode()).hexdigest()

    def output_name(self, max_side: int) -> str:
        ext = ".jpg" if max_side else Path(self.image).suffix.lower()
        return f"cc3m/{self.shard}/{self.key.replace('/', '_')}{ext}"


def _member_kind(name: str) -> str | None:
    ext = Path(name).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return {".txt": "caption", ".json": "meta"}.get(ext)


class Source:
    """An img2dataset output folder in either layout: lists samples, reads their members."""

    def __init__(self, src: Path):
        self.src = src
        self.tars = sorted(src.glob("*.tar"))
        self.folders = sorted(p for p in src.iterdir() if p.is_dir())
        if not self.tars and not self.folders:
            raise PrepareError(
                f"{src}: no shard folders (00000/) or tar shards (00000.tar); pass the "
                "--output_folder of img2dataset (output_format files or webdataset)"
            )
        self.layout = "webdataset" if self.tars else "files"
        self._open: dict[str, tarfile.TarFile] = {}
        self.stray: list[str] = []

    def samples(self) -> list[Sample]:
        found: dict[tuple[str, str], Sample] = {}
        for shard, names in self._tar_names() if self.tars else self._folder_names():
            for name in names:
                base = name.rsplit("/", 1)[-1]
                kind = _member_kind(base)
                if kind is None or base.startswith(".") or "." not in base:
                    self.stray.append(f"{shard}/{name}")
                    continue
                key = name[: len(name) - len(base)] + base.split(".", 1)[0]
                sample = found.setdefault((shard, key), Sample(shard, key))
                setattr(sample, kind, name)
        return list(found.values())

    def _folder_names(self):
        for folder in self.folders:
            yield folder.name, sorted(p.name for p in folder.iterdir() if p.is_file())

    def _tar_names(self):
        for path in self.tars:
            try:
                tar = self._open[path.stem] = tarfile.open(path)  # reads the headers only
                yield path.stem, [m.name for m in tar.getmembers() if m.isfile()]
            except (tarfile.TarError, OSError) as error:
                raise PrepareError(
                    f"{path}: not a readable tar shard ({error}); re-download that shard or move it out of the folder"
                ) from None

    def read(self, sample: Sample, member: str | None) -> bytes | None:
        if member is None:
            return None
        if self.layout == "files":
            return (self.src / sample.shard / member).read_bytes()
        handle = self._open[sample.shard].extractfile(member)
        return handle.read() if handle else None

    def path(self, sample: Sample) -> Path:
        return (self.src / sample.shard / sample.image).absolute()

    def close(self) -> None:
        for tar in self._open.values():
            tar.close()


def _failure(meta: bytes | None) -> str:
    """The reason a sample without an image has none, from its metadata."""
    try:
        info = json.loads(meta) if meta else {}
    except ValueError:
        info = {}
    status = info.get("status") if isinstance(info, dict) else None
    if status and status != "success":
        return "download failed (status in .json is not success)"
    return "no image file"


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _resized_jpeg(data: bytes, max_side: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= max_side:
            image.load()  # decodes: corrupt data raises here
            return data  # already small enough: keep the original bytes (no second lossy encode)
        scale = max_side / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if image.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale when that still covers the target: far less work
            image.draft("RGB", target)
        image.load()
        if image.mode != "RGB":
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        if image.size != target and max(image.size) > max_side:
            image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def _check_decodes(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


class Writer:
    """Writes (or verifies from the state of an earlier run) one sample's image under OUT/images."""

    def __init__(self, out: Path, source: Source, max_side: int):
        self.root = out / "images"
        self.source = source
        self.max_side = max_side
        self.state_path = out / STATE_FILE
        self.options = {"version": STATE_VERSION, "max_side": max_side, "layout": source.layout}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        self.previous = state.get("outputs", {}) if state.get("options") == self.options else {}
        self.outputs: dict[str, dict] = {}

    def _unchanged(self, name: str, source_digest: str) -> bool:
        record = self.previous.get(name)
        if not record or record["source"] != source_digest:
            return False
        path = self.root / name
        if record.get("link"):
            return path.is_symlink() and os.readlink(path) == record["link"]
        try:
            return _digest(path.read_bytes()) == record["output"]
        except OSError:
            return False

    def write(self, sample: Sample, data: bytes) -> tuple[str, bool] | str:
        """(output name, reused) when usable, else the reason to skip."""
        name = sample.output_name(self.max_side)
        source_digest = _digest(data)
        if self._unchanged(name, source_digest):
            self.outputs[name] = self.previous[name]
            return name, True
        try:
            written = _resized_jpeg(data, self.max_side) if self.max_side else _check_decodes(data)
        except Exception:  # noqa: BLE001 - Pillow raises many types for corrupt data; all mean "unusable"
            return "image does not decode"
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.max_side or self.source.layout == "webdataset":
            payload = written if self.max_side else data
            if path.is_symlink():
                path.unlink()
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, path)
            self.outputs[name] = {"source": source_digest, "output": _digest(payload)}
        else:
            ensure_link(path, self.source.path(sample))
            self.outputs[name] = {"source": source_digest, "link": os.readlink(path)}
        return name, False

    def finish(self, keep: set[str]) -> int:
        """Remove images this or an earlier run wrote that are not in ``keep``; save the state.

        Returns how many were removed.
        """
        removed = 0
        for name in (set(self.previous) | set(self.outputs)) - keep:
            try:
                (self.root / name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        outputs = {name: self.outputs[name] for name in sorted(keep)}
        write_json_if_changed(self.state_path, {"options": self.options, "outputs": outputs})
        return removed


def _image_id(key: str):
    return int(key) if key.isdigit() else key


def _process(
    source: Source, writer: Writer, samples: list[Sample], result: Prepared, workers: int, limit: int, progress: bool
) -> list[tuple[Sample, str, str]]:
    """Read, decode and write samples in order until ``limit`` are usable (0 = all)."""
    kept: list[tuple[Sample, str, str]] = []
    reused = 0
    bar = progress_bar(total=len(samples), desc="cc3m", unit="img", progress=progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        position = 0
        while position < len(samples) and (not limit or len(kept) < limit):
            chunk = samples[position : position + CHUNK]
            position += len(chunk)
            loaded = []
            for order, sample in sorted(enumerate(chunk), key=lambda item: (item[1].shard, item[1].key)):
                # read in shard order (sequential in a tar), keep in the chunk's (rank) order below
                caption = (source.read(sample, sample.caption) or b"").decode("utf-8", errors="replace").strip()
                if not caption:
                    result.skip("missing or empty caption (.txt)", f"{sample.shard}/{sample.key}")
                    continue
                loaded.append((order, sample, caption, source.read(sample, sample.image)))
            outcomes = list(pool.map(lambda item: writer.write(item[1], item[3]), loaded))
            for (_, sample, caption, _), outcome in sorted(zip(loaded, outcomes), key=lambda pair: pair[0][0]):
                if isinstance(outcome, str):
                    result.skip(outcome, f"{sample.shard}/{sample.key}")
                elif not limit or len(kept) < limit:
                    kept.append((sample, caption, outcome[0]))
                    reused += outcome[1]
            bar.update(len(chunk))
    bar.close()
    result.counts["reused_from_earlier_run"] = reused
    return kept


def _stats_failures(src: Path) -> int | None:
    """Failed downloads img2dataset recorded in its ``*_stats.json`` (None if there are none)."""
    total, found = 0, False
    for path in src.glob("*_stats.json"):
        try:
            total += int(json.loads(path.read_text(encoding="utf-8")).get("failed_to_download", 0))
            found = True
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return total if found else None


def prepare_cc3m(
    src: str | Path,
    out: str | Path,
    *,
    limit: int = 0,
    seed: int = 0,
    max_side: int = 0,
    workers: int = 0,
    progress: bool = True,
) -> Prepared:
    """Training pairs from an img2dataset output folder (see the module docstring)."""
    src, out = Path(src), Path(out).absolute()  # absolute: the fields are used from other folders
    require_path(src, "img2dataset output folder", "pass the --output_folder of img2dataset", folder=True)
    if limit < 0 or max_side < 0:
        raise PrepareError(f"--limit and --max-side must be >= 0 (got {limit}, {max_side})")
    if out.absolute() == src.absolute() or src.absolute() in out.absolute().parents:
        raise PrepareError(f"{out}: --out lies inside --src {src}; choose a folder outside the download")
    result = Prepared(fields={"train_ann": str(out / "train.json"), "train_images": str(out / "images")})
    source = Source(src)
    try:
        samples = source.samples()
        for name in source.stray:
            result.skip("stray member (not an image, .txt or .json of a sample)", name)
        with_image = []
        for sample in samples:
            if sample.image is None:
                result.skip(_failure(source.read(sample, sample.meta)), f"{sample.shard}/{sample.key}")
            else:
                with_image.append(sample)
        order = (lambda s: s.rank(seed)) if limit else (lambda s: (s.shard, s.key))
        with_image.sort(key=order)
        writer = Writer(out, source, max_side)
        kept = _process(source, writer, with_image, result, workers or os.cpu_count() or 1, limit, progress)
    finally:
        source.close()
    if not kept:
        raise PrepareError(
            f"{src}: no usable sample ({dict(result.skipped)}); check that it is an img2dataset "
            "output folder with images and captions"
        )
    kept.sort(key=lambda item: (item[0].shard, item[0].key))
    entries = [{"image": name, "caption": caption, "image_id": _image_id(sample.key)} for sample, caption, name in kept]
    write_json_if_changed(out / "train.json", entries)
    result.counts = {
        "layout": source.layout,
        "samples": len(samples),
        "pairs": len(entries),
        **result.counts,
        "unused_images_removed": writer.finish({e["image"] for e in entries}),
    }
    recorded = _stats_failures(src)
    if recorded is not None:
        result.counts["failed_downloads_in_stats_json"] = recorded
    return result
