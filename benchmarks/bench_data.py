"""Data pipeline throughput per loader worker, and how long training waits for data.

1. Images per second of one worker (one process, one torch thread, as a
   DataLoader worker runs) turning a 256-320 px JPEG into a normalised
   256 x 256 training tensor, side by side:

   * ``original``: the original code base's design, PIL open + torchvision v1
     ``RandomResizedCrop(256, (0.5, 1), bicubic)`` + flip + ``RandAugment(2, 7)``
     + ``ToTensor`` + ``Normalize`` on the PIL image;
   * ``clipstudy``: the training set exactly as ``clipstudy.engine.train`` builds it
     for the paper profile (``build_train_set`` + ``SeededSamples``), i.e.
     clipstudy's image reading and ``train_transform``;
   * candidates: ``torchvision.io.decode_jpeg`` and/or ``transforms.v2`` on
     uint8 tensors; and decoding alone, to split decode from transform.

   Plus the evaluation transform (decode + resize + normalise), original vs
   clipstudy, and the demo profile's pipeline on its 32 px PNGs.
2. The demo training loop's data and step time per batch, clipstudy's set-up
   against the same without its fused transform ending and fused optimizer,
   side by side, with and without the decoded-image cache (:func:`demo_loop`).
3. The fraction of training time spent waiting for data in the demo sweep:
   ``data_time / (data_time + step_time)`` from the ``history.csv`` files under
   ``reports/runs/demo/`` (or, if there are none, from a short demo run).

Usage: ``python benchmarks/bench_data.py [--quick]``; writes ``reports/benchmarks/data.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine, median, table, torch_threads, write_json  # noqa: E402

from clipstudy import paths  # noqa: E402
from clipstudy.data.datasets import CLIP_MEAN, CLIP_STD  # noqa: E402
from clipstudy.data.sampling import SeededSamples, sample_seed  # noqa: E402
from clipstudy.engine.build import build_train_set  # noqa: E402
from clipstudy.engine.config import make_config  # noqa: E402
from clipstudy.engine.splits import TEST, build_eval_sets  # noqa: E402

DEFAULT_OUT = OUT_DIR / "data.json"
RUNS = paths.runs_dir("demo")


# ---------------------------------------------------------------- synthetic JPEGs
def make_jpegs(folder: Path, n: int, seed: int = 0, low: int = 256, high: int = 320) -> list[str]:
    """``n`` photo-like RGB JPEGs (quality 90) with sides in [low, high] px; writes a train.json beside them."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(low, high + 1, 2))
        # smooth colour field (upsampled coarse noise) + edges + grain: JPEG sizes like photos'
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 12, (h, w, 3))
        stripes = np.sin(np.arange(w) / rng.uniform(3, 12))[None, :, None] * 25
        pixels = np.clip(field + grain + stripes, 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(pixels).save(folder / "images" / name, format="JPEG", quality=90)
        names.append(name)
    entries = [{"image": name, "caption": f"a photo number {i}", "image_id": i} for i, name in enumerate(names)]
    (folder / "train.json").write_text(json.dumps(entries))
    return [str(folder / "images" / name) for name in names]


# ---------------------------------------------------------------- pipelines
def original_train(size: int = 256):
    """The original code base's design: PIL + torchvision v1 transforms."""
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandAugment(2, 7),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return lambda path: transform(Image.open(path).convert("RGB"))


def original_eval(size: int = 256):
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return lambda path: transform(Image.open(path).convert("RGB"))


def _v2_train(size: int):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(2, 7),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def decode_jpeg_v2_train(size: int = 256):
    """Candidate: torchvision.io.decode_jpeg to a uint8 tensor, then transforms.v2 on the tensor."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    transform = _v2_train(size)
    return lambda path: transform(decode_jpeg(read_file(path), mode=ImageReadMode.RGB))


def pil_v2_train(size: int = 256):
    """Candidate: PIL decode, then transforms.v2 on the uint8 tensor."""
    from torchvision.transforms.functional import pil_to_tensor

    transform = _v2_train(size)
    return lambda path: transform(pil_to_tensor(Image.open(path).convert("RGB")))


def hybrid_train(size: int = 256):
    """Candidate: PIL decode; crop + resize + flip on the uint8 tensor (torchvision v1's crop
    parameters, the v2 kernel: torch's uint8 antialiased bicubic); RandAugment on PIL again
    (faster there than on tensors); then clipstudy's fused tensor ending.
    Not bit-identical to the PIL resize (the two bicubic implementations round differently)."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as F
    from torchvision.transforms.v2 import functional as F2

    from clipstudy.data.datasets import Compose

    rest = Compose([T.RandAugment(2, 7), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def transform(path):
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        i, j, h, w = T.RandomResizedCrop.get_params(pixels, scale=[0.5, 1.0], ratio=[3 / 4, 4 / 3])
        pixels = F2.resized_crop(pixels, i, j, h, w, [size, size], T.InterpolationMode.BICUBIC, antialias=True)
        if torch.rand(1) < 0.5:
            pixels = pixels.flip(-1)
        return rest(F.to_pil_image(pixels))

    return transform


def pil_decode():
    def decode(path):
        with Image.open(path) as image:
            return image.convert("RGB")

    return decode


def torchvision_decode():
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return lambda path: decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


# ---------------------------------------------------------------- timing
def images_per_s(pipelines: dict, keys: list, repeats: int) -> dict[str, dict]:
    """Per pipeline: images/s over ``keys``, interleaved at the finest grain.

    Each key is processed by every pipeline in turn (in a rotating order), so
    load drifts hit all pipelines alike; a key's time is its fastest of
    ``repeats`` passes (dropping preemptions), and a pipeline's time is the sum
    over keys. One untimed pass warms caches first. Before each call the torch
    generator is seeded as clipstudy seeds that training sample, so pipelines
    that draw alike apply the same crop and the same RandAugment operations
    (whose costs differ by an order of magnitude).
    """
    import time

    names = list(pipelines)
    best = {name: [float("inf")] * len(keys) for name in names}
    for r in range(repeats + 1):
        for k, key in enumerate(keys):
            shift = (r + k) % len(names)
            for name in names[shift:] + names[:shift]:
                torch.manual_seed(sample_seed(0, 0, key))
                start = time.perf_counter()
                pipelines[name](key)
                elapsed = time.perf_counter() - start
                if r:
                    best[name][k] = min(best[name][k], elapsed)
    return {
        name: {"images_per_s": len(keys) / sum(times), "ms_per_image": 1e3 * sum(times) / len(keys)}
        for name, times in best.items()
    }


def bench_pipelines(quick: bool, tmp: Path) -> dict:
    n = 60 if quick else 200
    repeats = 2 if quick else 3
    paths = make_jpegs(tmp / "jpeg", n)
    retrieval = tmp / "jpeg" / "retrieval.json"
    retrieval.write_text(json.dumps([{"image": Path(p).name, "caption": ["a photo"]} for p in paths]))
    images = str(tmp / "jpeg" / "images")
    config = make_config(
        "paper",
        train_ann=str(tmp / "jpeg" / "train.json"),
        train_images=images,
        retrieval_ann=str(retrieval),
        retrieval_images=images,
        pretrained=False,
    )
    train_set, eval_set = build_train_set(config), build_eval_sets(config, TEST).retrieval
    items = SeededSamples(train_set, config.seed)
    clipstudy_train = lambda i: items[(i, 0)][0]  # noqa: E731
    # clipstudy's image reading with its transforms run by torchvision's own Compose (no fused ending)
    from torchvision import transforms as T

    from clipstudy.data.datasets import load_rgb_image

    plain_train = T.Compose(train_set.transform.transforms)
    index = list(range(n))
    torch.manual_seed(0)
    train = images_per_s(
        {
            "original": lambda i, f=original_train(): f(paths[i]),
            "clipstudy": clipstudy_train,
            "clipstudy, torchvision Compose": lambda i: plain_train(load_rgb_image(paths[i])),
            "PIL + tensor crop + PIL RandAugment": lambda i, f=hybrid_train(): f(paths[i]),
            "decode_jpeg + v2": lambda i, f=decode_jpeg_v2_train(): f(paths[i]),
            "PIL + v2": lambda i, f=pil_v2_train(): f(paths[i]),
            "decode only: PIL": lambda i, f=pil_decode(): f(paths[i]),
            "decode only: decode_jpeg": lambda i, f=torchvision_decode(): f(paths[i]),
        },
        index,
        repeats,
    )
    base = train["original"]["images_per_s"]
    for row in train.values():
        row["vs_original"] = row["images_per_s"] / base

    # evaluation transform: deterministic, so the outputs can be compared too
    reference = original_eval()
    evaluation = images_per_s(
        {"original": lambda i: reference(paths[i]), "clipstudy": lambda i: eval_set[i][0]}, index, repeats
    )
    evaluation["original"]["vs_original"] = 1.0
    evaluation["clipstudy"]["vs_original"] = (
        evaluation["clipstudy"]["images_per_s"] / evaluation["original"]["images_per_s"]
    )
    diff = max(float((reference(paths[i]) - eval_set[i][0]).abs().max()) for i in index[:20])
    return {
        "n_images": n,
        "image_sides_px": [256, 320],
        "output_px": 256,
        "train": train,
        "eval": evaluation,
        "eval_max_abs_difference_normalised": diff,
    }


def bench_demo_pipeline(quick: bool, tmp: Path) -> dict:
    """The demo profile's training items (32 px PNGs, its own transform), as the demo sweep loads them."""
    from clipstudy.data.demo import make_demo_data

    make_demo_data(
        tmp / "demo", seed=0, image_size=32, train_size=256, retrieval_size=8, zeroshot_per_class=1, zeroshot_classes=2
    )
    config = make_config("demo", data=str(tmp / "demo"))
    from torchvision import transforms as T

    from clipstudy.data.datasets import load_rgb_image

    train_set = build_train_set(config)
    items = SeededSamples(train_set, config.seed)
    plain = T.Compose(train_set.transform.transforms)
    out = images_per_s(
        {
            "clipstudy": lambda i: items[(i, 0)][0],
            "clipstudy, torchvision Compose": lambda i: plain(
                load_rgb_image(train_set.image_root / train_set.images[i])
            ),
        },
        list(range(len(train_set))),
        2 if quick else 3,
    )
    base = out["clipstudy, torchvision Compose"]["images_per_s"]
    for row in out.values():
        row["vs_torchvision_compose"] = row["images_per_s"] / base
    return out


# ---------------------------------------------------------------- waiting for data
def _history_fraction(paths: list[Path]) -> dict | None:
    cells = []
    for path in paths:
        try:
            with path.open() as f:
                rows = list(csv.DictReader(f))
        except OSError:
            continue
        data = sum(float(r["data_time"]) for r in rows if r.get("data_time"))
        step = sum(float(r["step_time"]) for r in rows if r.get("step_time"))
        if data + step > 0:
            cells.append(
                {
                    "cell": path.parent.name,
                    "steps": len(rows),
                    "data_s": data,
                    "step_s": step,
                    "data_wait_fraction": data / (data + step),
                    "data_ms_per_step": 1e3 * data / len(rows),
                    "step_ms_per_step": 1e3 * step / len(rows),
                }
            )
    if not cells:
        return None
    data, step = sum(c["data_s"] for c in cells), sum(c["step_s"] for c in cells)
    return {"cells": cells, "data_wait_fraction": data / (data + step)}


def data_wait(quick: bool, tmp: Path, runs: Path = RUNS) -> dict:
    found = _history_fraction(sorted(runs.glob("*/history.csv"))) if runs.is_dir() else None
    if found is not None:
        return {"source": str(runs), **found}
    # No demo sweep here: a short demo run on a generated copy of the demo set.
    from clipstudy.data.demo import make_demo_data
    from clipstudy.engine.train import train

    make_demo_data(
        tmp / "demo_run_data",
        seed=0,
        image_size=32,
        train_size=640,
        retrieval_size=8,
        zeroshot_per_class=1,
        zeroshot_classes=2,
    )
    # speed only: random towers, so the benchmark does not pretrain the demo towers first
    config = make_config(
        "demo",
        pretrained=False,
        data=str(tmp / "demo_run_data"),
        out=str(tmp / "demo_run"),
        epochs=1,
        max_steps=8 if quick else 20,
        threads=1,
    )
    train(config, progress=False)
    found = _history_fraction([tmp / "demo_run" / "history.csv"])
    return {"source": f"a short demo run ({config.max_steps} steps; no history under {runs})", **found}


def demo_loop(quick: bool, tmp: Path) -> dict:
    """The demo training loop's data and step time per batch, three set-ups side by side.

    ``clipstudy``: the loader and ``train_step`` as clipstudy runs them, its decoded-image
    cache warm (as in every epoch after the first); the same without the cache;
    ``torchvision Compose + torch's default optimizer``: the same with the transforms run
    by ``T.Compose`` and the optimizer built with ``foreach=None`` (torch's default
    implementation), i.e. without clipstudy's fused ToTensor + Normalize ending and
    fused optimizer step. The set-ups take turns batch by batch; each has its own
    copy of the model, so both train the same way.
    """
    import time

    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    from clipstudy.data.datasets import make_collate
    from clipstudy.data.demo import make_demo_data
    from clipstudy.data.sampling import EpochBatches
    from clipstudy.engine.build import build_run
    from clipstudy.engine.train import train_step

    make_demo_data(
        tmp / "loop_data",
        seed=0,
        image_size=32,
        train_size=1024,
        retrieval_size=8,
        zeroshot_per_class=1,
        zeroshot_classes=2,
    )
    setups = {}
    for name, params, cache in (
        ("clipstudy (decoded-image cache, from epoch 2 on)", {}, True),
        ("clipstudy without the image cache", {}, False),
        ("torchvision Compose + torch's default optimizer, no cache", {"foreach": None}, False),
    ):
        config = make_config(
            "demo",
            pretrained=False,
            data=str(tmp / "loop_data"),
            out=str(tmp / "loop_run"),
            optimizer_params=params,
            cache_images=cache,
        )
        run = build_run(config, tmp / "loop_run")
        if params:
            run.train_set.transform = T.Compose(run.train_set.transform.transforms)
        if cache:  # epoch 1 fills the cache; every later epoch reads from it
            for i in range(len(run.train_set)):
                run.train_set[i]
        loader = DataLoader(
            SeededSamples(run.train_set, config.seed),
            collate_fn=make_collate(run.tokenizer, config.max_length),
            batch_sampler=EpochBatches(len(run.train_set), config.batch_size, config.seed, 0),
        )
        setups[name] = (run, iter(loader))
    n = 8 if quick else 24
    times = {name: {"data": [], "step": []} for name in setups}
    for b in range(n + 2):  # two warm-up batches each
        for name in list(setups) if b % 2 == 0 else list(setups)[::-1]:
            run, batches = setups[name]
            start = time.perf_counter()
            batch = next(batches)
            data = time.perf_counter() - start
            start = time.perf_counter()
            train_step(run, batch)
            step = time.perf_counter() - start
            if b >= 2:
                times[name]["data"].append(data)
                times[name]["step"].append(step)
    out = {}
    for name, t in times.items():
        data_ms, step_ms = 1e3 * median(t["data"]), 1e3 * median(t["step"])
        out[name] = {
            "batches": n,
            "data_ms": data_ms,
            "step_ms": step_ms,
            "data_wait_fraction": data_ms / (data_ms + step_ms),
        }
    return out


# ---------------------------------------------------------------- entry points
def run(
    quick: bool = False, out: str | Path | None = DEFAULT_OUT, threads: int | None = 1, runs: str | Path = RUNS
) -> dict:
    """Pipelines side by side, then the demo sweep's data wait from the ``history.csv`` files under ``runs``."""
    with tempfile.TemporaryDirectory() as tmp, torch_threads(threads):
        tmp = Path(tmp)
        results = {
            "benchmark": "data",
            "quick": quick,
            **machine(),
            "paper_pipeline": bench_pipelines(quick, tmp),
            "demo_pipeline": bench_demo_pipeline(quick, tmp),
            "demo_loop": demo_loop(quick, tmp),
            "demo_data_wait": data_wait(quick, tmp, Path(runs)),
        }
    write_json(results, out)
    return results


def print_results(results: dict) -> None:
    p = results["paper_pipeline"]
    print(
        f"training transform, {p['n_images']} JPEGs of {p['image_sides_px'][0]}-{p['image_sides_px'][1]} px -> "
        f"{p['output_px']} px, one worker ({results['torch_threads']} torch thread)"
    )
    rows = [{"pipeline": name, **values} for name, values in p["train"].items()]
    print(
        table(
            rows,
            [
                ("pipeline", "pipeline", "{}"),
                ("images_per_s", "images/s", "{:.0f}"),
                ("ms_per_image", "ms/image", "{:.2f}"),
                ("vs_original", "x original", "{:.2f}"),
            ],
        )
    )
    rows = [{"pipeline": name, **values} for name, values in p["eval"].items()]
    print("evaluation transform (resize 256 x 256 + normalise)")
    print(
        table(
            rows,
            [
                ("pipeline", "pipeline", "{}"),
                ("images_per_s", "images/s", "{:.0f}"),
                ("ms_per_image", "ms/image", "{:.2f}"),
                ("vs_original", "x original", "{:.2f}"),
            ],
        )
    )
    print(
        f"  max |clipstudy - original| of the evaluation tensors: {p['eval_max_abs_difference_normalised']:.3g} "
        "(normalised units)"
    )
    rows = [{"pipeline": name, **values} for name, values in results["demo_pipeline"].items()]
    print("demo pipeline (32 px PNGs, the demo profile's transform), one worker")
    print(
        table(
            rows,
            [
                ("pipeline", "pipeline", "{}"),
                ("images_per_s", "images/s", "{:.0f}"),
                ("ms_per_image", "ms/image", "{:.3f}"),
                ("vs_torchvision_compose", "x torchvision Compose", "{:.2f}"),
            ],
        )
    )
    rows = [{"setup": name, **values} for name, values in results["demo_loop"].items()]
    print("demo training loop per batch (batch 32), side by side")
    print(
        table(
            rows,
            [
                ("setup", "set-up", "{}"),
                ("data_ms", "data ms", "{:.1f}"),
                ("step_ms", "step ms", "{:.1f}"),
                ("data_wait_fraction", "wait fraction", "{:.3f}"),
            ],
        )
    )
    w = results["demo_data_wait"]
    print(f"demo training time spent waiting for data: {100 * w['data_wait_fraction']:.1f}% ({w['source']})")
    cells = w["cells"]
    if len(cells) > 12:  # a whole sweep: the extremes and the overall figure are what matter
        cells = sorted(cells, key=lambda c: c["data_wait_fraction"])
        cells = cells[:3] + cells[-3:]
        print(f"(the 3 lowest and 3 highest of {len(w['cells'])} cells)")
    print(
        table(
            cells,
            [
                ("cell", "cell", "{}"),
                ("steps", "steps", "{}"),
                ("data_ms_per_step", "data ms/step", "{:.1f}"),
                ("step_ms_per_step", "step ms/step", "{:.1f}"),
                ("data_wait_fraction", "wait fraction", "{:.3f}"),
            ],
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 images, 2 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in a loader worker)")
    parser.add_argument("--runs", default=str(RUNS), help="demo run directories (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(args.quick, args.out, args.threads or None, args.runs)
    print_results(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
