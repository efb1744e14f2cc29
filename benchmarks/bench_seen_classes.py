"""How much of the demo's zero-shot accuracy would be memory of the label space: seen against held-out classes.

The demo's zero-shot classes are 15 colour x shape combinations that no model sees before
evaluation (``clipstudy.data.demo_scenes.HELD_OUT``). The first demo generator took its classes
from combinations that training and the towers' pretraining had shown. This benchmark measures
what that difference is worth on the same trained models: it draws a second zero-shot set of 15
*seen* combinations (three of each shape's four seen colours, every colour two or three times, as
in the held-out set), drawn exactly like the test set (``class_scene``, 140
images a class, the same prompts, its own random stream), and scores each given run's final
checkpoint on it with ``python -m clipstudy evaluate --zeroshot_images``. Same model, same number
of classes (chance 6.67 %), same kind of image: the gap between the two accuracies is what a
model gains from having seen the exact combination.

Usage: ``python benchmarks/bench_seen_classes.py --runs reports/runs/demo/tuned [--data data/demo]``
(the runs of ``make demo``: they keep their final checkpoints); writes
``reports/benchmarks/seen_classes.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, REPO, machine, table, write_json  # noqa: E402

from clipstudy.data.demo import write_zeroshot_folder
from clipstudy.data.demo_scenes import COLOURS, SEEN_KINDS, SHAPES

STREAM = 97  # the seen set's own random stream (the generator's use SeedSequence(seed).spawn)


def seen_classes(per_shape: int = 3) -> list[str]:
    """``per_shape`` seen colours of each shape (15 class ids, like the held-out set), chosen greedily so that
    every colour is used as evenly as possible (the least used first, ties in colour order)."""
    uses = dict.fromkeys(COLOURS, 0)
    chosen = []
    for shape in SHAPES:
        seen = [c for c in COLOURS if (c, shape) in SEEN_KINDS]
        for colour in sorted(seen, key=lambda c: (uses[c], list(COLOURS).index(c)))[:per_shape]:
            uses[colour] += 1
            chosen.append(f"{colour}_{shape}")
    return sorted(chosen)


def write_seen_zeroshot(folder: Path, *, per_class: int = 140, image_size: int = 32, seed: int = 0) -> list[str]:
    """An ImageFolder of the seen classes, written as the demo writes its zero-shot sets; returns the class ids."""
    classes = seen_classes()
    write_zeroshot_folder(np.random.default_rng([seed, STREAM]), classes, per_class, folder, image_size)
    return classes


def score(run: Path, zeroshot: Path) -> float:
    """The run's final checkpoint's zero-shot top-1 on ``zeroshot`` (the test sets' retrieval is scored too)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipstudy",
            "evaluate",
            "--run",
            str(run),
            "--json",
            "--zeroshot_images",
            str(zeroshot),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout)["zeroshot_top1"])


def run(runs: Path, data: Path, per_class: int = 140) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    image_size = int(manifest["parameters"]["image_size"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        classes = write_seen_zeroshot(Path(tmp) / "seen", per_class=per_class, image_size=image_size)
        for metrics in sorted(runs.glob("*/metrics.json")):
            record = json.loads(metrics.read_text())
            if record.get("status") != "completed":
                continue
            held_out = float(record["zeroshot_top1"])
            seen = score(metrics.parent, Path(tmp) / "seen")
            rows.append({"run": metrics.parent.name, "held_out": held_out, "seen": seen, "gap": seen - held_out})
    gaps = [r["gap"] for r in rows]
    summary = {
        "runs": len(rows),
        "held_out_mean": float(np.mean([r["held_out"] for r in rows])) if rows else None,
        "seen_mean": float(np.mean([r["seen"] for r in rows])) if rows else None,
        "gap_mean": float(np.mean(gaps)) if rows else None,
        "gap_min": min(gaps, default=None),
        "gap_max": max(gaps, default=None),
    }
    result = {"machine": machine(), "seen_classes": classes, "per_class": per_class, "rows": rows, "summary": summary}
    columns = [("run", "run", "{}"), ("held_out", "held-out ACC@1", "{:.2f}"), ("seen", "seen ACC@1", "{:.2f}")]
    print(table(rows, [*columns, ("gap", "seen - held-out", "{:+.2f}")]))
    print(json.dumps(summary, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of run folders (each with metrics.json)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="the demo data the runs trained on")
    parser.add_argument("--per-class", type=int, default=140)
    args = parser.parse_args(argv)
    write_json(run(args.runs, args.data, args.per_class), OUT_DIR / "seen_classes.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
