"""Training throughput of the paper configuration on one GPU, on synthetic JPEG data.

What it runs is what ``clipstudy.engine.train`` runs: a ``Run`` from ``build_run``
(random-init ResNet-50 + DistilBERT-base at 256 px, bf16 autocast,
channels_last, the profile's loss/optimizer/scheduler, deterministic
algorithms as in training), the training set built by ``build_train_set`` over
synthetic 256-320 px JPEGs (the real decode + RandomResizedCrop + flip +
RandAugment pipeline in loader workers, with the training loader's settings),
and ``train_step``. It reports:

* ``samples_per_s``: training samples per second over the timed steps;
* ``data_wait_fraction``: time blocked waiting for the next batch / wall time;
* ``mfu``: model FLOPs per second (forward + backward FLOPs of one step,
  counted by ``torch.utils.flop_counter``) / the device's measured matmul rate
  (a large bf16 matmul on CUDA, float32 on a CPU, measured first).

One setting per loader worker count (default: the profile's ``num_workers``
and one worker per CPU core). It finishes in well under 5 minutes on one GPU.
With ``--tiny`` it runs on a CPU in seconds (64 px, batch 4, 3 steps, small
encoders), which is how the test suite keeps it working; without a GPU it
says so in its output.

Captions are tokenised by a word-level tokenizer built from the synthetic
captions and padded to DistilBERT-base's vocabulary size (30522), so the
text tower has the paper's exact size without downloading anything.

Usage: ``python benchmarks/gpu_throughput.py [--tiny] [--steps N] [--batch B] [--workers W ...]``;
writes ``reports/benchmarks/gpu_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine, table, torch_threads, write_json  # noqa: E402

DEFAULT_OUT = OUT_DIR / "gpu_throughput.json"
NO_GPU = "no GPU available: ran on the CPU, so these numbers say nothing about GPU throughput"
WORDS = (
    "a photo of the red blue green small large dog cat car tree house person on in with next to "
    "beach street table sky water field people sitting standing white black old young"
).split()


# ---------------------------------------------------------------- synthetic data
def make_data(folder: Path, n_files: int, n_pairs: int, low: int, high: int, vocab_size: int | None) -> None:
    """JPEGs, a train.json of ``n_pairs`` pairs cycling over them, and a tokenizer folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        w, h = (int(v) for v in rng.integers(low, high + 1, 2))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:05d}.jpg", format="JPEG", quality=90)
    captions = [" ".join(rng.choice(WORDS, int(rng.integers(6, 20)))) for _ in range(n_pairs)]
    entries = [{"image": f"{i % n_files:05d}.jpg", "caption": c, "image_id": i} for i, c in enumerate(captions)]
    (folder / "train.json").write_text(json.dumps(entries))
    _tokenizer(vocab_size).save_pretrained(str(folder / "tokenizer"))


def _tokenizer(vocab_size: int | None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted(set(WORDS))
    if vocab_size:
        tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


# ---------------------------------------------------------------- measurements
def matmul_rate(device: torch.device, n: int, repeats: int) -> dict:
    """FLOP/s of an n x n matmul: bf16 on CUDA, float32 on a CPU (the dtype training runs in there)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_flops_per_s": 2 * n**3 / seconds}


def step_flops(run, batch: dict) -> float:
    """Forward + backward FLOPs of the model on one batch (torch.utils.flop_counter; matmuls and convolutions)."""
    from bench_train_step import _inputs, bare_forward_backward
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bare_forward_backward(run, _inputs(run, batch))
    run.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, workers: int, steps: int, warmup: int) -> dict:
    """Train ``warmup + steps`` steps from the real loader; time the last ``steps``."""
    from clipstudy.data.datasets import make_collate
    from clipstudy.data.sampling import SeededSamples, train_loader
    from clipstudy.engine.train import train_step

    config = run.config
    items = SeededSamples(run.train_set, config.seed)
    collate = make_collate(run.tokenizer, max_length=config.max_length)
    run.config.num_workers = workers
    loader = train_loader(run, items, collate, epoch=0)
    iterator = iter(loader)
    run.model.train()
    wait, losses = 0.0, []
    start = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(run.device)
            start, wait = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        batch = next(iterator)
        wait += time.perf_counter() - t0
        losses.append(train_step(run, batch)[0])
    _sync(run.device)
    wall = time.perf_counter() - start
    del iterator
    return {
        "workers": workers,
        "steps": steps,
        "wall_s": wall,
        "step_ms": 1e3 * wall / steps,
        "samples_per_s": steps * config.batch_size / wall,
        "data_wait_fraction": min(1.0, wait / wall),
        "loss_finite": all(v == v and abs(v) != float("inf") for v in losses),
    }


# ---------------------------------------------------------------- entry points
def run(
    tiny: bool = False,
    quick: bool = False,
    steps: int | None = None,
    batch_size: int | None = None,
    workers: list[int] | None = None,
    device: str = "auto",
    out: str | Path | None = DEFAULT_OUT,
    deterministic: bool = True,
    threads: int | None = None,
) -> dict:
    """Measure throughput; returns (and writes to ``out``) the results.

    Args:
        tiny: CPU-sized check (64 px, batch 4, 3 steps, small encoders, 1 worker).
        quick: fewer steps (GPU).
        steps, batch_size, workers: override the defaults (paper: batch 128,
            40 steps (quick: 15) after 5 warm-up steps, workers = the profile's
            ``num_workers`` and one per CPU core).
        deterministic: as training runs (``RunConfig.deterministic``, default True).
        threads: torch threads of the training process (default: torch's own on CUDA,
            1 on a CPU, where the loader workers need the other cores).
    """
    if threads is None and choose_device_name(device) == "cpu":
        threads = 1
    with torch_threads(threads):
        return _run(tiny, quick, steps, batch_size, workers, device, out, deterministic)


def choose_device_name(device: str) -> str:
    from clipstudy.engine.build import choose_device

    return choose_device(device).type


def _run(tiny, quick, steps, batch_size, workers, device, out, deterministic) -> dict:
    from clipstudy.engine.build import build_run, choose_device
    from clipstudy.engine.config import make_config

    dev = choose_device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if tiny:
        size, batch, n_steps, warmup = 64, batch_size or 4, steps or 3, 1
        overrides = dict(
            image_encoder="small_resnet",
            text_encoder="small_distilbert",
            small_resnet_widths=[8, 16, 32],
            text_dim=32,
            text_layers=1,
            embed_dim=32,
        )
        worker_counts = workers or [1]
    else:
        size, batch, n_steps, warmup = 256, batch_size or 128, steps or (15 if quick else 40), 5
        overrides = {}
        worker_counts = workers or sorted({make_config("paper").num_workers, cores})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_pairs = batch * (warmup + n_steps)
        make_data(
            tmp / "data",
            n_files=min(n_pairs, 16 if tiny else 512),
            n_pairs=n_pairs,
            low=size,
            high=size + size // 4,
            vocab_size=None if tiny else 30522,
        )
        config = make_config(
            "paper",
            train_ann=str(tmp / "data" / "train.json"),
            train_images=str(tmp / "data" / "images"),
            tokenizer=str(tmp / "data" / "tokenizer"),
            pretrained=False,
            image_size=size,
            batch_size=batch,
            epochs=1,
            amp="bf16",
            device=str(dev),
            deterministic=deterministic,
            out=str(tmp / "run"),
            **overrides,
        )
        previous = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark,
        )
        if config.deterministic:  # as clipstudy.engine.train sets up a run
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True
        try:
            peak = matmul_rate(dev, 256 if tiny else (8192 if dev.type == "cuda" else 2048), repeats=3 if tiny else 30)
            run_ = build_run(config, tmp / "run")
            from clipstudy.data.datasets import make_collate

            first = make_collate(run_.tokenizer, config.max_length)([run_.train_set[i] for i in range(batch)])
            flops = step_flops(run_, first)
            rows = [measure(run_, w, n_steps, warmup) for w in worker_counts]
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.backends.cudnn.benchmark = previous[2]
    for row in rows:
        row["model_flops_per_s"] = flops * row["steps"] / row["wall_s"]
        row["mfu"] = row["model_flops_per_s"] / peak["matmul_flops_per_s"]
    results = {
        "benchmark": "gpu_throughput",
        "tiny": tiny,
        "device": str(dev),
        **machine(),
        "note": None if dev.type == "cuda" else NO_GPU,
        "config": {
            "image_encoder": config.image_encoder,
            "text_encoder": config.text_encoder,
            "image_size": size,
            "batch_size": batch,
            "amp": "bf16" if dev.type == "cuda" else "none (CPU)",
            "channels_last": dev.type == "cuda",
            "deterministic": config.deterministic,
            "parameters": sum(p.numel() for p in run_.model.parameters()),
            "cpu_cores": cores,
        },
        **peak,
        "model_flops_per_step": flops,
        "rows": rows,
    }
    best = max(rows, key=lambda r: r["samples_per_s"])
    results.update(samples_per_s=best["samples_per_s"], data_wait_fraction=best["data_wait_fraction"], mfu=best["mfu"])
    write_json(results, out)
    return results


def print_results(results: dict) -> None:
    c = results["config"]
    if results["note"]:
        print(results["note"])
    print(
        f"{results['device']} ({results.get('gpu', results['cpu'])}): {c['image_encoder']} + {c['text_encoder']}, "
        f"{c['image_size']} px, batch {c['batch_size']}, amp {c['amp']}, channels_last {c['channels_last']}, "
        f"{c['parameters'] / 1e6:.2f}M parameters"
    )
    print(
        f"measured {results['matmul_dtype']} matmul ({results['matmul_n']}^2): "
        f"{results['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s; model {results['model_flops_per_step'] / 1e9:.1f} "
        "GFLOP per step (forward + backward)"
    )
    print(
        table(
            results["rows"],
            [
                ("workers", "workers", "{}"),
                ("steps", "steps", "{}"),
                ("step_ms", "step ms", "{:.1f}"),
                ("samples_per_s", "samples/s", "{:.1f}"),
                ("data_wait_fraction", "data wait", "{:.3f}"),
                ("mfu", "MFU", "{:.3f}"),
            ],
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized check: 64 px, batch 4, 3 steps, small encoders")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--non-deterministic",
        action="store_true",
        help="allow non-deterministic kernels (cudnn autotuning); training is deterministic by default",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(
        tiny=args.tiny,
        quick=args.quick,
        steps=args.steps,
        batch_size=args.batch,
        workers=args.workers,
        device=args.device,
        out=args.out,
        deterministic=not args.non_deterministic,
    )
    print_results(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
