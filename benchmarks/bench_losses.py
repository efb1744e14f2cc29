"""Forward + backward time of every loss, as a ratio to the CLIP loss.

All losses are timed side by side in one run: each repeat times every loss
once, in a rotating order, on the same embeddings, so drifts in machine load
hit all of them alike. The median over repeats is reported.

    python benchmarks/bench_losses.py [--batch-sizes 128 512] [--dim 256] [--repeats 30]

Prints a table and writes ``reports/benchmarks/losses.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from clipstudy.core.losses import available_losses, make_loss

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_losses(batch: int, dim: int, repeats: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(batch)
    num_samples = 8 * batch
    image = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    text = torch.randn(batch, dim, generator=g).to(device).requires_grad_(True)
    losses = {
        name: make_loss(name, temperature=0.01, num_samples=num_samples).to(device) for name in available_losses()
    }
    indices = [torch.randperm(num_samples, generator=g)[:batch].to(device) for _ in range(repeats + warmup)]
    names = list(losses)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            image.grad = text.grad = None
            for p in losses[name].parameters():
                p.grad = None
            sync(device)
            start = time.perf_counter()
            losses[name](image, text, indices[r]).backward()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "losses.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )

    results = []
    for batch in args.batch_sizes:
        times = time_losses(batch, args.dim, args.repeats, args.warmup, device)
        clip = statistics.median(times["clip"])
        print(f"\nB={batch} D={args.dim} on {device} (median of {args.repeats}, forward + backward)")
        print(f"{'loss':<10} {'ms':>9} {'x clip':>7}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<10} {1e3 * median:9.3f} {median / clip:7.2f}")
            results.append(
                {
                    "loss": name,
                    "batch": batch,
                    "dim": args.dim,
                    "median_ms": 1e3 * median,
                    "ratio_to_clip": median / clip,
                    "min_ms": 1e3 * min(values),
                    "max_ms": 1e3 * max(values),
                }
            )
    report = {
        "benchmark": "loss forward+backward time",
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


def run(quick: bool = False, out: str | Path | None = None) -> dict:
    """The benchmark from Python (prints its tables); ``quick``: B=128 only, 10 repeats."""
    argv = ["--batch-sizes", "128", "--repeats", "10"] if quick else []
    if out is not None:
        argv += ["--out", str(out)]
    return main(argv + ["--threads", "1"])


if __name__ == "__main__":
    main()
