"""Run every benchmark and print its tables (what ``make bench`` runs).

Each benchmark compares its variants side by side in one run and writes its
JSON under ``reports/benchmarks/``:

* ``bench_eval``: retrieval metrics vs the original argsort loop; zero-shot classifier (``eval.json``)
* ``bench_losses``: every loss's forward + backward against CLIP's (``losses.json``)
* ``bench_train_step``: a full training step vs the bare encoders, per loss (``train_step.json``)
* ``bench_data``: training transform throughput per worker; demo data wait (``data.json``)
* ``bench_sweep``: the demo sweep's wall time per cell and papermill's share (``sweep.json``)
* ``gpu_throughput``: the paper configuration on a GPU (``gpu_throughput.json``), only when one is present

Usage: ``python benchmarks/run_all.py [--quick] [--only NAME ...] [--runs DIR]``. The full
run takes several minutes on two CPU cores; ``--quick`` runs smaller sizes in
about a minute or two. A failing benchmark is reported and the others still run;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import torch_threads  # noqa: E402

BENCHMARKS = ("bench_eval", "bench_losses", "bench_train_step", "bench_data", "bench_sweep", "gpu_throughput")


def _run_one(name: str, quick: bool, runs: str | None) -> None:
    module = importlib.import_module(name)
    if name == "gpu_throughput":
        import torch

        if not torch.cuda.is_available():
            print("no GPU on this machine: skipped (tests/test_benchmarks.py runs it at tiny sizes on the CPU)")
            return
        results = module.run(tiny=False, quick=quick)
    elif runs and name in ("bench_data", "bench_sweep"):
        results = module.run(quick=quick, runs=runs)
    else:
        results = module.run(quick=quick)
    printer = getattr(module, "print_results", None) or getattr(module, "_print", None)
    if printer is not None:
        printer(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument(
        "--runs",
        default=None,
        help="demo run directories read by bench_data and bench_sweep (default reports/runs/demo)",
    )
    args = parser.parse_args(argv)
    failed = []
    started = time.perf_counter()
    for name in args.only or BENCHMARKS:
        print(f"\n=== {name}{' (quick)' if args.quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        try:
            with torch_threads(None):  # each benchmark sets its own threads; restore torch's afterwards
                _run_one(name, args.quick, args.runs)
        except Exception:  # noqa: BLE001  one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"\nall benchmarks: {time.perf_counter() - started:.0f} s; JSON under reports/benchmarks/")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
