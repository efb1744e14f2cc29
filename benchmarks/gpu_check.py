"""The prepared GPU check (``make gpu-check``): one script, one JSON, under 4 minutes on one GPU.

It measures, on synthetic JPEGs and the paper configuration (random-init
ResNet-50 + DistilBERT-base, 256 px, bf16 autocast, channels_last):

* ``training``: samples/s and model FLOPs utilisation (FLOPs of one step
  counted by ``torch.utils.flop_counter.FlopCounterMode`` over the measured
  matmul rate), from :mod:`gpu_throughput` (its quick setting);
* ``peak_memory_gb``: peak GPU memory allocated while training at batch 128
  (the goal: it fits a 24 GB GPU);
* ``loader``: the training data loader alone with N workers (decode +
  augmentation), samples/s, against the GPU's training rate: a ratio >= 1
  means the loader keeps the GPU fed;
* ``retrieval_eval``: time of the retrieval evaluation on 5k images x 25k
  captions (similarity matrix + every recall and rank) on the device;
* ``ddp``: two steps of a 2-process NCCL DDP run (``torchrun``) when there are
  2+ GPUs; otherwise it says it was skipped and why.

On a CPU (``--tiny``, as the tests run it) every part runs at toy sizes and
the JSON's ``note`` says the numbers say nothing about a GPU: the script needs
a GPU for real numbers.

Usage: ``python benchmarks/gpu_check.py [--tiny] [--out PATH]``; writes
``reports/benchmarks/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402
from common import OUT_DIR, REPO, machine, sync, write_json  # noqa: E402

DEFAULT_OUT = OUT_DIR / "gpu_check.json"
TIME_LIMIT_S = 240
GPU_MEMORY_GOAL_GB = 24


def paper_config(data: Path, size: int, batch: int, tiny: bool, device: str, out: Path):
    from clipstudy.engine.config import make_config

    small = (
        dict(
            image_encoder="small_resnet",
            text_encoder="small_distilbert",
            small_resnet_widths=[8, 16, 32],
            text_dim=32,
            text_layers=1,
            embed_dim=32,
        )
        if tiny
        else {}
    )
    return make_config(
        "paper",
        train_ann=str(data / "train.json"),
        train_images=str(data / "images"),
        tokenizer=str(data / "tokenizer"),
        pretrained=False,
        image_size=size,
        batch_size=batch,
        epochs=1,
        amp="bf16",
        device=device,
        out=str(out),
        **small,
    )


def loader_throughput(config, workers: int, batches: int) -> dict:
    """Samples/s of the training loader alone (decode, crop, flip, RandAugment, tokenise) with ``workers``."""
    from transformers import PreTrainedTokenizerFast

    from clipstudy.data.datasets import make_collate
    from clipstudy.data.sampling import SeededSamples, train_loader
    from clipstudy.engine.build import build_train_set

    train_set = build_train_set(config)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(config.tokenizer)
    config.num_workers = workers
    run = SimpleNamespace(config=config, train_set=train_set, rank=0, world_size=1, device=torch.device("cpu"))
    loader = train_loader(
        run, SeededSamples(train_set, config.seed), make_collate(tokenizer, max_length=config.max_length), epoch=0
    )
    iterator = iter(loader)
    next(iterator)  # the workers' start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    wall = time.perf_counter() - start
    del iterator
    return {"workers": workers, "batches": batches, "samples_per_s": batches * config.batch_size / wall}


def retrieval_eval_time(device: torch.device, n_images: int, per_image: int = 5, dim: int = 256) -> dict:
    """Wall time of the retrieval evaluation on random unit features: similarity + recalls and ranks."""
    from clipstudy.core.metrics import retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=gen), dim=1).to(device)
    texts = torch.nn.functional.normalize(torch.randn(n_images * per_image, dim, generator=gen), dim=1).to(device)
    txt2img = torch.arange(n_images).repeat_interleave(per_image)
    sync(device)
    start = time.perf_counter()
    metrics = retrieval_metrics(images @ texts.T, txt2img)
    sync(device)
    return {
        "images": n_images,
        "captions": n_images * per_image,
        "seconds": time.perf_counter() - start,
        "txt_r1_random": metrics["txt_r1"],
    }


def ddp_two_steps(config, out: Path, gpus: int, allow_cpu: bool) -> dict:
    """Two optimizer steps of a 2-process DDP run through torchrun (NCCL on GPUs; gloo on a CPU if allowed)."""
    if gpus < 2 and not allow_cpu:
        return {"skipped": f"needs 2+ GPUs (found {gpus})"}
    # training ends with an evaluation: a few training pairs serve as its retrieval set
    pairs = json.loads(Path(config.train_ann).read_text())[:8]
    retrieval = out.parent / "retrieval.json"
    retrieval.write_text(json.dumps([{"image": p["image"], "caption": [p["caption"]]} for p in pairs]))
    fields = {
        "train_ann": config.train_ann,
        "train_images": config.train_images,
        "tokenizer": config.tokenizer,
        "pretrained": "false",
        "image_size": config.image_size,
        "batch_size": 2 * min(config.batch_size, 64),
        "max_steps": 2,
        "epochs": 1,
        "amp": config.amp,
        "num_workers": 2,
        "out": str(out),
        "device": "auto" if gpus >= 2 else "cpu",
        "retrieval_ann": str(retrieval),
        "retrieval_images": config.train_images,
    }
    if config.image_encoder != "resnet50":
        fields.update(
            image_encoder=config.image_encoder,
            text_encoder=config.text_encoder,
            small_resnet_widths=json.dumps(config.small_resnet_widths),
            text_dim=config.text_dim,
            text_layers=config.text_layers,
            embed_dim=config.embed_dim,
        )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "clipstudy",
        "train",
        "--profile",
        "paper",
        "--no-progress",
        *[f"--{k}={v}" for k, v in fields.items()],
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=180)
    result = {
        "backend": "nccl" if gpus >= 2 else "gloo (CPU)",
        "returncode": done.returncode,
        "seconds": time.perf_counter() - start,
    }
    if done.returncode == 0:
        result["world_size"] = json.loads((out / "config.json").read_text())["world_size"]
        result["global_step"] = json.loads((out / "metrics.json").read_text())["global_step"]
    else:
        result["error"] = "\n".join(line for line in done.stderr.splitlines() if "error" in line.lower())[-1500:]
    return result


def run(
    tiny: bool = False, device: str = "auto", out: str | Path | None = DEFAULT_OUT, ddp_on_cpu: bool = False
) -> dict:
    """Run every check; return (and write to ``out``) the results."""
    from clipstudy.engine.build import choose_device

    started = time.perf_counter()
    dev = choose_device(device)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    training = gpu_throughput.run(tiny=tiny, quick=True, device=str(dev), out=None)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    best = max(training["rows"], key=lambda r: r["samples_per_s"])
    size, batch = training["config"]["image_size"], training["config"]["batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        gpu_throughput.make_data(
            data,
            n_files=16 if tiny else 256,
            n_pairs=batch * 8,
            low=size,
            high=size + size // 4,
            vocab_size=None if tiny else 30522,
        )
        config = paper_config(data, size, batch, tiny, str(dev), Path(tmp) / "run")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        loader = [loader_throughput(config, w, batches=2 if tiny else 6) for w in ([1] if tiny else sorted({4, cores}))]
        for row in loader:
            row["ratio_to_training"] = row["samples_per_s"] / best["samples_per_s"]
        ddp = ddp_two_steps(config, Path(tmp) / "ddp", gpus, allow_cpu=ddp_on_cpu)  # it sets its own out
    results = {
        "benchmark": "gpu_check",
        "tiny": tiny,
        "device": str(dev),
        "gpus": gpus,
        **machine(),
        "note": None if dev.type == "cuda" else gpu_throughput.NO_GPU + "; run `make gpu-check` on a GPU machine",
        "training": {
            k: training[k]
            for k in (
                "config",
                "samples_per_s",
                "mfu",
                "model_flops_per_step",
                "matmul_flops_per_s",
                "matmul_dtype",
                "data_wait_fraction",
                "rows",
            )
        },
        "peak_memory_gb": peak,
        "peak_memory_goal_gb": GPU_MEMORY_GOAL_GB,
        "fits_goal": None if peak is None else peak < GPU_MEMORY_GOAL_GB,
        "loader": loader,
        "retrieval_eval": retrieval_eval_time(dev, 100 if tiny else 5000),
        "ddp": ddp,
    }
    results["wall_s"] = time.perf_counter() - started
    results["within_time_limit"] = results["wall_s"] < TIME_LIMIT_S
    write_json(results, out)
    return results


def print_results(results: dict) -> None:
    if results["note"]:
        print(f"NOTE: {results['note']}")
    t = results["training"]
    print(
        f"training ({t['config']['image_size']} px, batch {t['config']['batch_size']}, amp {t['config']['amp']}, "
        f"channels_last {t['config']['channels_last']}): {t['samples_per_s']:.1f} samples/s, MFU {t['mfu']:.3f}"
    )
    if results["peak_memory_gb"] is not None:
        print(
            f"peak GPU memory: {results['peak_memory_gb']:.2f} GB (goal < {results['peak_memory_goal_gb']} GB: "
            f"{'met' if results['fits_goal'] else 'NOT met'})"
        )
    for row in results["loader"]:
        print(
            f"loader, {row['workers']} workers: {row['samples_per_s']:.1f} samples/s = "
            f"{row['ratio_to_training']:.2f}x the training rate"
        )
    r = results["retrieval_eval"]
    print(f"retrieval evaluation {r['images']} x {r['captions']}: {r['seconds']:.2f} s")
    d = results["ddp"]
    print(
        "DDP: "
        + (
            d["skipped"]
            if "skipped" in d
            else f"{d['backend']}, exit {d['returncode']}, {d.get('global_step')} steps in {d['seconds']:.1f} s"
        )
    )
    print(f"total {results['wall_s']:.0f} s (limit {TIME_LIMIT_S} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on a CPU (what the tests run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(tiny=args.tiny, device=args.device, out=args.out)
    print_results(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
