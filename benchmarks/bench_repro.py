"""Cross-CPU reproducibility of the demo: which library settings change its numbers, where runs diverge, at what cost.

A fresh clone's ``make demo`` on another machine moved seed-0 cells by up to 2.07
Average points. This benchmark makes this machine take the code paths other x86-64
CPUs take, one setting at a time, and runs the same short demo training under each in
a fresh subprocess (so that the environment variables take effect when the libraries
load), ``python -m clipstudy train --profile demo --data data/demo --seed 0 --loss clip
--optimizer adamw --max_steps 60 --threads 1`` (the cached pretrained towers of
``data/demo`` are reused). The settings:

* ``ATEN_CPU_CAPABILITY`` (default / avx2 / avx512): which of torch's own vectorised
  kernels run (reductions, softmax, norms, element-wise maths, attention);
* ``MKL_CBWR`` (oneMKL's conditional numerical reproducibility: COMPATIBLE, AVX2) and
  ``MKL_ENABLE_INSTRUCTIONS`` (the ISA oneMKL may dispatch to): matrix products (BLAS);
* ``DNNL_MAX_CPU_ISA`` and ``torch.backends.mkldnn.enabled``: convolutions (oneDNN);
* ``--deterministic false`` (``torch.use_deterministic_algorithms``) and the thread count;
* the simulated AVX2-only machine (torch, oneMKL and oneDNN all capped at AVX2), and the
  candidate pins (the most conservative combination, and an AVX2 one) alone and on top of
  the simulated machines, which shows whether the pin overrides what the machine would pick.

For each setting it reports the first step whose loss (and whose any logged value: loss,
gradient norm, weight norm, embedding statistics) differs from the machine default's
(``history.csv``), the largest difference in the final loss and in the scores
(``metrics.json``: ``val_average``, ``average`` and their parts), which kernel families
give other bits (a probe hashes a matrix product, a convolution forward + backward,
attention, reductions and element-wise maths in the same process, and records the
oneMKL CNR mode and the oneDNN implementations), whether repeats are identical, and
the wall-time ratio against the machine default, measured side by side (interleaved
repeats, medians). Settings with bit-identical runs share an ``outcome`` letter.

Then, on a tiny copy of the demo data (``make-demo-data --train-size 64``), it builds the
pretrained towers under each setting (reduced pretraining settings by default; ``--full-pretrain``
for the demo's own) and compares the towers' digests, and it generates that copy twice,
once with numpy and glibc capped below AVX2, and compares the data digests: so a divergence
is located in the data, the pretrained towers, the training steps, or evaluation only.

Usage: ``python benchmarks/bench_repro.py [--quick] [--max-steps N] [--repeats R] [--loss L]
[--optimizer O] [--full-pretrain] [--no-pretrain]``; writes ``reports/benchmarks/repro.json``.
``run(...)`` does the same from Python. The full run takes about 15 minutes on 2 idle cores,
``--quick`` about 4 (fewer settings, 20 steps, one repeat).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, REPO, machine, median, table, write_json  # noqa: E402

DEFAULT_OUT = OUT_DIR / "repro.json"
DEMO_DATA = REPO / "data" / "demo"
COST_GOAL = 1.5  # a pin is worth the demo's default if it costs at most this factor
# every variable a setting may set: removed from the inherited environment first, so "machine default" is that
CONTROLLED = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "NPY_DISABLE_CPU_FEATURES",
    "GLIBC_TUNABLES",
)
# scores compared (metrics.json): validation and test headline and their parts
SCORES = (
    "val_average",
    "average",
    "val_txt_r1",
    "val_img_r1",
    "val_zeroshot_top1",
    "txt_r1",
    "img_r1",
    "zeroshot_top1",
)
# history.csv columns that are not numbers of the model (times, position, schedule)
NOT_COMPARED = {"step", "epoch", "lr", "samples_per_s", "data_time", "step_time"}
# a tiny demo set for the pretraining and data checks, and pretraining settings that build towers in seconds
TINY_DATA = ["--train-size", "64", "--retrieval-size", "8", "--zeroshot-per-class", "1", "--zeroshot-classes", "2"]
QUICK_PRETRAIN = {"images": 640, "image_epochs": 1, "captions": 640, "text_epochs": 1}
# numpy and glibc's libm without AVX2/FMA/AVX-512 (an older x86-64 CPU), for the data generation check
OLD_X86 = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ",
}

AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
CONSERVATIVE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
# MKL_CBWR=AVX2 is no pin on a non-Intel CPU (oneMKL falls back to AUTO there: the probe shows CNR:AUTO), so the
# AVX2 pin takes the COMPATIBLE branch of oneMKL too
PINNED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


@dataclass(frozen=True)
class Setting:
    """One code path: environment variables, oneDNN on or off, torch threads, deterministic algorithms."""

    name: str
    env: dict = field(default_factory=dict)
    mkldnn: bool = True
    threads: int = 1
    deterministic: bool = True
    note: str = ""

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.env.items()]
        if not self.mkldnn:
            parts.append("mkldnn.enabled=False")
        if self.threads != 1:
            parts.append(f"threads={self.threads}")
        if not self.deterministic:
            parts.append("deterministic=False")
        return " ".join(parts) or "(nothing set)"


def settings(quick: bool = False, avx512: bool = True) -> list[Setting]:
    """The settings compared; the first is the baseline (this machine's default code paths)."""
    rows = [
        Setting("machine default", note="what make demo runs"),
        Setting("threads 2", threads=2, note="torch/MKL/oneDNN split work over 2 threads"),
        Setting("deterministic off", deterministic=False, note="torch.use_deterministic_algorithms(False)"),
        Setting("aten default", {"ATEN_CPU_CAPABILITY": "default"}, note="torch kernels without SIMD dispatch"),
        Setting("aten avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, note="torch kernels of an AVX2 CPU"),
        Setting("aten avx512", {"ATEN_CPU_CAPABILITY": "avx512"}, note="torch kernels of an AVX-512 CPU"),
        Setting("mkl COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, note="oneMKL CNR: SSE2 paths, any x86-64"),
        Setting("mkl CBWR AVX2", {"MKL_CBWR": "AVX2"}, note="oneMKL CNR: AVX2 paths (Intel CPUs only)"),
        Setting("mkl isa AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, note="oneMKL dispatch of an AVX2 CPU"),
        Setting("onednn AVX2", {"DNNL_MAX_CPU_ISA": "AVX2"}, note="oneDNN kernels of an AVX2 CPU"),
        Setting("mkldnn off", mkldnn=False, note="convolutions in torch's own kernels, not oneDNN"),
        Setting("avx2 machine", AVX2_MACHINE, note="simulated AVX2-only CPU (torch, oneMKL, oneDNN)"),
        Setting("pinned avx2", PINNED_AVX2, mkldnn=False, note="candidate: torch AVX2 kernels, MKL CNR, no oneDNN"),
        Setting(
            "pinned avx2 + avx2 machine",
            {**AVX2_MACHINE, **PINNED_AVX2},
            mkldnn=False,
            note="the AVX2 pin on the simulated AVX2 CPU",
        ),
        Setting("conservative", CONSERVATIVE, mkldnn=False, note="candidate: no SIMD dispatch, MKL CNR, no oneDNN"),
        Setting(
            "conservative + avx2 machine",
            {**AVX2_MACHINE, **CONSERVATIVE},
            mkldnn=False,
            note="the conservative pin on the simulated AVX2 CPU",
        ),
        Setting(
            "conservative + threads 2",
            CONSERVATIVE,
            mkldnn=False,
            threads=2,
            note="the conservative pin, 2 threads",
        ),
    ]
    if not avx512:
        rows = [s for s in rows if s.name != "aten avx512"]
    if quick:
        keep = ("machine default", "aten default", "aten avx2", "mkl COMPATIBLE", "mkldnn off", "avx2 machine")
        rows = [s for s in rows if s.name in keep or s.name.startswith("conservative")]
    return rows


# ---------------------------------------------------------------- the child process
def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def kernel_probe() -> dict:
    """Hashes of one op of each kernel family on fixed inputs, in this process's settings.

    Also prints oneMKL's and oneDNN's verbose lines for the matrix product and the
    convolution (the parent reads the CNR mode and the oneDNN implementations from them).
    """
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    out = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    a, b = r(128, 384), r(384, 256)
    sys.stdout.flush()
    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
        out["matmul"] = _digest(a @ b)
    x, w = r(32, 16, 16, 16).requires_grad_(True), r(32, 16, 3, 3).requires_grad_(True)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        y = F.conv2d(x, w, padding=1)
        y.backward(r(*y.shape))
    out["conv"] = _digest(y, x.grad, w.grad)
    q, k, v = r(8, 2, 30, 64), r(8, 2, 30, 64), r(8, 2, 30, 64)
    out["attention"] = _digest(F.scaled_dot_product_attention(q, k, v))
    t = r(64, 1000)
    out["reduction"] = _digest(t.sum(1), t.softmax(1), F.layer_norm(t, (1000,)), t.norm(dim=1), t.mean(0))
    out["elementwise"] = _digest(t.exp(), F.gelu(t), t.tanh(), t.log_softmax(1))
    return out


def child(spec_file: str) -> int:
    """Run in a fresh process: apply the in-process settings, probe the kernels, then run the clipstudy command."""
    spec = json.loads(Path(spec_file).read_text())
    import torch

    torch.backends.mkldnn.enabled = spec["mkldnn"]
    torch.set_num_threads(spec["threads"])
    Path(spec["probe"]).write_text(json.dumps(kernel_probe()))
    sys.stdout.flush()
    from clipstudy.__main__ import main as clipstudy_main

    return clipstudy_main(spec["argv"])


def run_child(setting: Setting, argv: list[str], workdir: Path, timeout: float = 1800) -> dict:
    """Run ``python -m clipstudy ARGV`` under ``setting`` in a fresh process; returns wall time, probe, logs."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "mkldnn": setting.mkldnn, "threads": setting.threads, "probe": str(workdir / "probe.json")}
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(setting.env)
    if "DNNL_MAX_CPU_ISA" in setting.env:  # the newer spelling too
        env["ONEDNN_MAX_CPU_ISA"] = setting.env["DNNL_MAX_CPU_ISA"]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(workdir / "spec.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"setting {setting.name!r}: clipstudy {' '.join(argv[:1])} exited {proc.returncode}:\n"
            + (proc.stderr or proc.stdout)[-3000:]
        )
    probe = json.loads((workdir / "probe.json").read_text())
    lines = proc.stdout.splitlines()
    cnr = sorted({part for line in lines if line.startswith("MKL_VERBOSE") for part in line.split() if "CNR:" in part})
    conv_impls = sorted(
        {
            line.split(",")[6]
            for line in lines
            if line.startswith("onednn_verbose") and ",exec," in line and ",convolution," in line
        }
    )
    probe["mkl_cnr"] = " ".join(cnr) or "-"
    probe["onednn_conv"] = " ".join(conv_impls) or "none (torch's own)"
    return {"wall_s": wall, "probe": probe}


# ---------------------------------------------------------------- one training run
def train_argv(data: Path, out: Path, setting: Setting, loss: str, optimizer: str, max_steps: int, seed: int) -> list:
    return [
        "train",
        "--profile",
        "demo",
        "--data",
        str(data),
        "--seed",
        str(seed),
        "--loss",
        loss,
        "--optimizer",
        optimizer,
        "--max_steps",
        str(max_steps),
        "--threads",
        str(setting.threads),
        "--deterministic",
        str(setting.deterministic).lower(),
        "--tensorboard",
        "false",
        "--out",
        str(out),
        "--no-progress",
    ]


def read_history(path: Path) -> list[dict]:
    """history.csv as a list of rows of floats (the columns that are numbers of the model, and the step)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if k == "step" or k not in NOT_COMPARED} for row in rows]


def train_once(setting: Setting, data: Path, tmp: Path, tag: str, loss, optimizer, max_steps, seed) -> dict:
    out = tmp / f"run-{tag}"
    child_result = run_child(
        setting, train_argv(data, out, setting, loss, optimizer, max_steps, seed), tmp / f"w-{tag}"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    history = read_history(out / "history.csv")
    sps = metrics.get("train_samples_per_s") or float("nan")
    train_s = metrics["steps_completed"] * config.get("batch_size", 32) / sps
    result = {
        **child_result,
        "train_s": train_s,
        "history": history,
        "scores": {k: metrics.get(k) for k in SCORES},
        "final_loss": history[-1]["loss"] if history else float("nan"),
        "steps": metrics["steps_completed"],
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------- comparisons
def first_difference(history: list[dict], reference: list[dict], columns: list[str] | None = None) -> tuple:
    """(step, column) of the first logged step where any of ``columns`` (default all) differs; (None, None) if none."""
    for row, ref in zip(history, reference):
        for column in columns or [c for c in ref if c != "step"]:
            a, b = row.get(column), ref.get(column)
            if not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
                return int(ref["step"]), column
    if len(history) != len(reference):
        return int(min(len(history), len(reference))) + 1, "length"
    return None, None


def outcome_key(result: dict) -> str:
    """A digest of everything a run produced that should repeat: the logged history and the scores."""
    blob = json.dumps([result["history"], result["scores"]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def max_abs(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return abs(float(a) - float(b))


def compare(result: dict, reference: dict) -> dict:
    loss_step, _ = first_difference(result["history"], reference["history"], ["loss"])
    any_step, column = first_difference(result["history"], reference["history"])
    score_diffs = {k: max_abs(result["scores"][k], reference["scores"][k]) for k in SCORES}
    return {
        "first_loss_diff_step": loss_step,
        "first_any_diff_step": any_step,
        "first_any_diff_column": column,
        "first_step_loss_diff": max_abs(result["history"][0]["loss"], reference["history"][0]["loss"]),
        "final_loss_diff": max_abs(result["final_loss"], reference["final_loss"]),
        "val_average_diff": score_diffs["val_average"],
        "average_diff": score_diffs["average"],
        "max_score_diff": max((v for v in score_diffs.values() if not math.isnan(v)), default=float("nan")),
        "score_diffs": score_diffs,
    }


def divergence_stage(row: dict) -> str:
    """Where this setting's run leaves the baseline's: the pretrained towers (built under the setting), and, from
    the same cached towers, the first training step that logs another value, or evaluation only."""
    if row["first_any_diff_step"] is not None:
        where = f"training step {row['first_any_diff_step']} ({row['first_any_diff_column']})"
    elif row["max_score_diff"] and row["max_score_diff"] > 0:
        where = "evaluation only"
    else:
        where = "identical"
    if row.get("towers_same") is False:
        return f"towers; {where} from the same towers"
    return where


# ---------------------------------------------------------------- the checks on a tiny data copy
def make_tiny_data(out: Path, setting: Setting) -> str:
    """Generate the tiny demo set into ``out`` under ``setting``'s environment; returns its content digest."""
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(setting.env)
    cmd = [sys.executable, "-m", "clipstudy", "make-demo-data", "--out", str(out), *TINY_DATA]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads((out / "manifest.json").read_text())["digest"]


def pretrain_digest(setting: Setting, tiny: Path, tmp: Path, tag: str, full: bool) -> dict:
    """Build the pretrained towers for a private copy of the tiny set under ``setting``; their digest and time."""
    data = tmp / f"tiny-{tag}"
    shutil.copytree(tiny, data, ignore=shutil.ignore_patterns("pretrained"))
    argv = train_argv(data, tmp / f"pre-run-{tag}", setting, "clip", "adamw", 1, 0)
    argv += ["--evaluate_test", "false"]
    if not full:
        argv += ["--pretrain", json.dumps(QUICK_PRETRAIN)]
    result = run_child(setting, argv, tmp / f"pre-w-{tag}")
    metas = sorted((data / "pretrained").glob("*/meta.json"), key=lambda m: m.stat().st_mtime)
    info = json.loads(metas[-1].read_text())
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(tmp / f"pre-run-{tag}", ignore_errors=True)
    return {"sha256": info["sha256"], "pretrain_wall_s": result["wall_s"], "pretrain_seconds": info.get("seconds")}


def towers_thread_check(data: Path, tmp: Path, threads=(1, 2)) -> dict:
    """Rebuild the full demo towers of ``data`` (a copy without its cache) at each thread count, machine default
    otherwise, and compare their digests with the cached towers' (whose meta.json says how many threads built them).

    Minutes: one full pretraining per thread count.
    """
    metas = sorted((data / "pretrained").glob("*/meta.json"))
    cached = json.loads(metas[0].read_text()) if metas else {}
    out = {"cached_sha256": cached.get("sha256"), "cached_torch_threads": cached.get("torch_threads"), "rebuilt": {}}
    for n in threads:
        setting = Setting(f"threads {n}", threads=n)
        copy = tmp / f"towers-{n}"
        shutil.copytree(data, copy, ignore=shutil.ignore_patterns("pretrained"))
        argv = train_argv(copy, tmp / f"towers-run-{n}", setting, "clip", "adamw", 1, 0) + ["--evaluate_test", "false"]
        print(f"  full towers at {n} thread(s)", file=sys.stderr, flush=True)
        result = run_child(setting, argv, tmp / f"towers-w-{n}")
        metas = sorted((copy / "pretrained").glob("*/meta.json"), key=lambda m: m.stat().st_mtime)
        sha = json.loads(metas[-1].read_text())["sha256"]
        out["rebuilt"][str(n)] = {
            "sha256": sha,
            "same_as_cached": sha == cached.get("sha256"),
            "wall_s": result["wall_s"],
        }
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(tmp / f"towers-run-{n}", ignore_errors=True)
    return out


# demo cells (optimizer, loss) at full length: the two that moved most between machines, and the default one
FULL_CELLS = (("adam", "vicreg"), ("adam", "sogclr"), ("adamw", "clip"))
FULL_SETTINGS = (
    "machine default",
    "aten avx2",
    "mkl COMPATIBLE",
    "mkldnn off",
    "avx2 machine",
    "pinned avx2",
    "pinned avx2 + avx2 machine",
    "conservative",
    "conservative + avx2 machine",
)
CACHED = "cached towers"  # the data set's own cached towers, machine default (what a rerun here gives)


def tuned_rates(table: Path) -> dict[str, float]:
    """The tuned protocol's rate per ``optimizer:loss`` from a tuning table (what ``make demo`` runs), or {}."""
    try:
        from clipstudy.study.tuning_table import rates_from

        return rates_from(table, "tuned")
    except Exception:  # noqa: BLE001 (no table: the profile's default rates)
        return {}


def full_cells(
    rows_settings: list[Setting], data: Path, tmp: Path, cells=FULL_CELLS, seed: int = 0, jobs: int = 2
) -> list[dict]:
    """``make demo``'s cells at full length under each setting, as a fresh clone runs them: a copy of the data
    without its towers, the first cell building them under the setting, every cell at its tuned rate.

    Also the same cells from the data set's own cached towers (machine default). Settings run ``jobs`` at a
    time (each subprocess one thread, as make demo's cells); these runs are not timed.
    """
    from concurrent.futures import ThreadPoolExecutor

    rates = tuned_rates(REPO / "reports" / "demo" / "tuning.csv")

    def one(setting: Setting, source: Path | None) -> dict:
        tag = str(abs(hash(setting.name)))
        copy = data
        if source is None:
            copy = tmp / f"full-{tag}"
            shutil.copytree(data, copy, ignore=shutil.ignore_patterns("pretrained"))
        result = {"setting": CACHED if source is not None else setting.name, "cells": {}}
        for optimizer, loss in cells:
            out = tmp / f"full-run-{tag}-{optimizer}-{loss}"
            argv = train_argv(copy, out, setting, loss, optimizer, 0, seed)
            if f"{optimizer}:{loss}" in rates:
                argv += ["--lr", repr(rates[f"{optimizer}:{loss}"])]
            child_result = run_child(setting, argv, tmp / f"full-w-{tag}-{optimizer}-{loss}")
            metrics = json.loads((out / "metrics.json").read_text())
            history = read_history(out / "history.csv")
            result["cells"][f"{optimizer}+{loss}"] = {
                "scores": {k: metrics.get(k) for k in SCORES},
                "final_loss": history[-1]["loss"],
                "steps": metrics["steps_completed"],
                "wall_s": child_result["wall_s"],
            }
            shutil.rmtree(out, ignore_errors=True)
        metas = sorted((copy / "pretrained").glob("*/meta.json"), key=lambda m: m.stat().st_mtime)
        result["towers_sha256"] = json.loads(metas[-1].read_text())["sha256"]  # the entry these cells used
        result["wall_s"] = sum(c["wall_s"] for c in result["cells"].values())
        if source is None:
            shutil.rmtree(copy, ignore_errors=True)
        return result

    todo = [(s, None) for s in rows_settings if s.name in FULL_SETTINGS] + [(rows_settings[0], data)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda job: one(*job), todo))
    base = results[0]
    for r in results:
        diffs = {
            cell: {
                "final_loss": max_abs(v["final_loss"], base["cells"][cell]["final_loss"]),
                **{k: max_abs(v["scores"][k], base["cells"][cell]["scores"][k]) for k in SCORES},
            }
            for cell, v in r["cells"].items()
        }
        r["diffs"] = diffs
        r["max_average_diff"] = max(d["average"] for d in diffs.values())
        r["max_val_average_diff"] = max(d["val_average"] for d in diffs.values())
        r["max_final_loss_diff"] = max(d["final_loss"] for d in diffs.values())
        r["towers_same"] = r["towers_sha256"] == base["towers_sha256"]
        r["wall_ratio"] = r["wall_s"] / base["wall_s"]
    return results


# ---------------------------------------------------------------- the benchmark
def cpu_info() -> dict:
    info = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("vendor_id", "model name", "cpu family", "model", "stepping") and key not in info:
            info[key] = value
        if key == "flags" and "flags" not in info:
            flags = set(value.split())
            info["flags"] = " ".join(
                f for f in ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_bf16") if f in flags
            )
    return info


def library_info() -> dict:
    import torch

    config = torch.__config__.show()
    lines = [line.strip("- ").strip() for line in config.splitlines()]
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": next((line for line in lines if "Math Kernel Library" in line), None),
        "onednn": next((line for line in lines if "MKL-DNN" in line or "oneDNN" in line), None),
        "parallel_backend": next(
            (
                line.split(":")[-1].strip()
                for line in torch.__config__.parallel_info().splitlines()
                if "backend" in line
            ),
            None,
        ),
    }


def run(
    quick: bool = False,
    out: str | Path | None = DEFAULT_OUT,
    max_steps: int | None = None,
    repeats: int | None = None,
    loss: str = "clip",
    optimizer: str = "adamw",
    seed: int = 0,
    data: str | Path = DEMO_DATA,
    pretrain: bool = True,
    full_pretrain: bool = False,
    only: list[str] | None = None,
    full: bool = False,
    towers_check: bool = False,
) -> dict:
    """Run every setting side by side; returns (and writes to ``out``) the results."""
    started = time.perf_counter()
    max_steps = max_steps or (20 if quick else 60)
    repeats = repeats or (1 if quick else 2)
    lib = library_info()
    cpu = cpu_info()
    rows_settings = settings(quick, avx512="avx512f" in cpu.get("flags", "avx512f"))
    if only:
        rows_settings = [s for s in rows_settings if s.name in only or s is rows_settings[0]]
    data = Path(data)
    if not (data / "manifest.json").is_file():
        raise SystemExit(f"no demo data in {data}: run `make demo-data` first")
    if not any((data / "pretrained").glob("*/towers.pt")):
        print(f"note: {data}/pretrained has no towers yet: the first run builds them (minutes)", file=sys.stderr)

    results: dict[str, list[dict]] = {s.name: [] for s in rows_settings}
    with tempfile.TemporaryDirectory(prefix="bench-repro-") as tmpdir:
        tmp = Path(tmpdir)
        # warm-up: the first run pays the file cache (and builds the towers if they are missing); not timed
        train_once(rows_settings[0], data, tmp, "warmup", loss, optimizer, max_steps, seed)
        for r in range(repeats):
            shift = r % len(rows_settings)
            for s in rows_settings[shift:] + rows_settings[:shift]:
                print(f"  repeat {r + 1}/{repeats}: {s.name}", file=sys.stderr, flush=True)
                tag = f"{rows_settings.index(s)}-{r}"
                results[s.name].append(train_once(s, data, tmp, tag, loss, optimizer, max_steps, seed))

        towers: dict[str, dict] = {}
        data_check = None
        if pretrain:
            tiny = tmp / "tiny"
            digest = make_tiny_data(tiny, rows_settings[0])
            old = Setting("x86-64-v2 numpy + libm", OLD_X86)
            digest_old = make_tiny_data(tmp / "tiny-old-x86", old)
            data_check = {"digest": digest, "digest_old_x86": digest_old, "same": digest == digest_old, "env": OLD_X86}
            for s in rows_settings:
                print(f"  pretraining: {s.name}", file=sys.stderr, flush=True)
                towers[s.name] = pretrain_digest(s, tiny, tmp, str(rows_settings.index(s)), full_pretrain)
        towers_threads = towers_thread_check(data, tmp) if towers_check else None
        full_results = None
        if full:
            print("  full-length demo cells (fresh towers per setting)", file=sys.stderr, flush=True)
            full_results = full_cells(rows_settings, data, tmp, seed=seed)

    base_name = rows_settings[0].name
    base = results[base_name][0]
    base_wall = median([x["wall_s"] for x in results[base_name]])
    base_train = median([x["train_s"] for x in results[base_name]])
    letters: dict[str, str] = {}
    rows = []
    for s in rows_settings:
        runs = results[s.name]
        first = runs[0]
        key = outcome_key(first)
        letters.setdefault(key, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(letters) % 26])
        row = {
            "setting": s.name,
            "describe": s.describe(),
            "note": s.note,
            "outcome": letters[key],
            "repeatable": all(outcome_key(x) == key for x in runs),
            **compare(first, base),
            "final_loss": first["final_loss"],
            "val_average": first["scores"]["val_average"],
            "average": first["scores"]["average"],
            "wall_s": median([x["wall_s"] for x in runs]),
            "train_s": median([x["train_s"] for x in runs]),
            "probe": first["probe"],
            "kernels_differing": [
                k
                for k in ("matmul", "conv", "attention", "reduction", "elementwise")
                if first["probe"][k] != base["probe"][k]
            ],
        }
        row["wall_ratio"] = row["wall_s"] / base_wall
        row["train_ratio"] = row["train_s"] / base_train
        if towers:
            row["towers_sha256"] = towers[s.name]["sha256"]
            row["towers_same"] = towers[s.name]["sha256"] == towers[base_name]["sha256"]
            row["pretrain_wall_s"] = towers[s.name]["pretrain_wall_s"]
        row["divergence"] = divergence_stage(row)
        rows.append(row)

    results_out = {
        "benchmark": "repro",
        "quick": quick,
        **machine(),
        "cpu_info": cpu,
        "libraries": lib,
        "command": f"clipstudy train --profile demo --data {data} --seed {seed} --loss {loss} "
        f"--optimizer {optimizer} --max_steps {max_steps} --threads T",
        "max_steps": max_steps,
        "repeats": repeats,
        "pretrain_check": "off" if not pretrain else ("full demo settings" if full_pretrain else QUICK_PRETRAIN),
        "data_check": data_check,
        "towers_thread_check": towers_threads,
        "full_cells": full_results,
        "rows": rows,
        "verdict": verdict(rows, full_results),
        "seconds": time.perf_counter() - started,
    }
    write_json(results_out, out)
    return results_out


def verdict(rows: list[dict], full: list[dict] | None = None) -> dict:
    """The unpinned spread, and for each candidate pin whether it holds on the simulated machines and its cost
    (with ``full``: also over the full-length cells, towers built under each setting)."""
    by_name = {r["setting"]: r for r in rows}
    unpinned = [r for r in rows if not r["setting"].startswith(("conservative", "pinned"))]
    spread = {
        "max_final_loss_diff": max(r["final_loss_diff"] for r in unpinned),
        "max_val_average_diff": max(r["val_average_diff"] for r in unpinned),
        "max_average_diff": max(r["average_diff"] for r in unpinned),
        "max_score_diff": max(r["max_score_diff"] for r in unpinned),
        "settings_changing_numbers": [r["setting"] for r in unpinned if r["divergence"] != "identical"],
    }
    pins = {}
    for pin in ("conservative", "pinned avx2"):
        if pin not in by_name:
            continue
        family = [r for r in rows if r["setting"].startswith(pin)]
        outcomes = {(r["outcome"], r.get("towers_sha256")) for r in family}
        pins[pin] = {
            "variants": [r["setting"] for r in family],
            "identical_across_variants": len(outcomes) == 1 and all(r["repeatable"] for r in family),
            "wall_ratio": by_name[pin]["wall_ratio"],
            "train_ratio": by_name[pin]["train_ratio"],
            "within_cost_goal": by_name[pin]["train_ratio"] <= COST_GOAL,
        }
        full_family = [r for r in full or [] if r["setting"].startswith(pin)]
        if full_family:
            keys = {
                json.dumps(
                    [r["towers_sha256"], {c: [v["scores"], v["final_loss"]] for c, v in r["cells"].items()}],
                    sort_keys=True,
                )
                for r in full_family
            }
            pins[pin]["full_cells_identical"] = len(keys) == 1 and len(full_family) > 1
            pins[pin]["full_cells_wall_ratio"] = next(r["wall_ratio"] for r in full_family if r["setting"] == pin)
    out = {"unpinned_spread": spread, "pins": pins, "cost_goal": COST_GOAL}
    if full:
        free = [r for r in full if not r["setting"].startswith(("conservative", "pinned"))]
        out["full_cells_unpinned_spread"] = {
            "max_final_loss_diff": max(r["max_final_loss_diff"] for r in free),
            "max_val_average_diff": max(r["max_val_average_diff"] for r in free),
            "max_average_diff": max(r["max_average_diff"] for r in free),
        }
    return out


def print_results(results: dict) -> None:
    cpu = results.get("cpu_info", {})
    lib = results["libraries"]
    print(
        f"cross-CPU reproducibility of a {results['max_steps']}-step demo run ({cpu.get('model name', '?')}, "
        f"family {cpu.get('cpu family', '?')} model {cpu.get('model', '?')}; flags {cpu.get('flags', '?')}; "
        f"torch {results['torch']} capability {lib['cpu_capability']}); {results['repeats']} repeat(s) per setting"
    )
    print(f"run: {results['command']}")
    print(
        table(
            results["rows"],
            [
                ("setting", "setting", "{}"),
                ("outcome", "out", "{}"),
                ("repeatable", "rep", "{}"),
                ("first_loss_diff_step", "1st loss step", "{}"),
                ("first_any_diff_step", "1st any step", "{}"),
                ("final_loss_diff", "|d loss|", "{:.2e}"),
                ("val_average_diff", "|d val_avg|", "{:.2f}"),
                ("average_diff", "|d average|", "{:.2f}"),
                ("max_score_diff", "|d score|max", "{:.2f}"),
                ("train_ratio", "train x", "{:.2f}"),
                ("wall_ratio", "wall x", "{:.2f}"),
                ("towers_same", "towers same", "{}"),
            ],
        )
    )
    print()
    print(
        table(
            [
                {
                    **r,
                    "capability": r["probe"]["capability"],
                    "cnr": r["probe"]["mkl_cnr"],
                    "conv": r["probe"]["onednn_conv"],
                    "kernels": ",".join(r["kernels_differing"]) or "-",
                }
                for r in results["rows"]
            ],
            [
                ("setting", "setting", "{}"),
                ("describe", "set", "{}"),
                ("capability", "aten", "{}"),
                ("cnr", "mkl", "{}"),
                ("conv", "onednn conv", "{}"),
                ("kernels", "probe kernels differing", "{}"),
                ("divergence", "diverges at", "{}"),
            ],
        )
    )
    check = results.get("data_check")
    if check:
        same = "identical" if check["same"] else "DIFFERENT"
        print(f"\ndata: the tiny demo set generated with numpy and libm below AVX2 is {same}")
    check = results.get("towers_thread_check")
    if check:
        rebuilt = ", ".join(
            f"{n} thread(s) {'same' if r['same_as_cached'] else 'DIFFERENT'}" for n, r in check["rebuilt"].items()
        )
        print(
            f"the data set's cached towers (built with {check['cached_torch_threads']} thread(s)), rebuilt here: "
            + rebuilt
        )
    if results.get("full_cells"):
        print_full_cells(results["full_cells"])
    v = results["verdict"]
    s = v["unpinned_spread"]
    print(
        f"unpinned code paths: final loss up to {s['max_final_loss_diff']:.2e}, val_average up to "
        f"{s['max_val_average_diff']:.2f}, average up to {s['max_average_diff']:.2f} points "
        f"(any score {s['max_score_diff']:.2f}); changing the numbers: "
        + (", ".join(s["settings_changing_numbers"]) or "none")
    )
    for pin, p in v["pins"].items():
        print(
            f"pin {pin!r}: {'identical' if p['identical_across_variants'] else 'NOT identical'} across "
            f"{', '.join(p['variants'])}; training loop x{p['train_ratio']:.2f}, whole run x{p['wall_ratio']:.2f} "
            f"({'within' if p['within_cost_goal'] else 'over'} the {v['cost_goal']}x goal)"
        )
        if "full_cells_identical" in p:
            print(
                f"    full-length cells: {'identical' if p['full_cells_identical'] else 'NOT identical'} across its "
                f"variants; cells' wall time x{p['full_cells_wall_ratio']:.2f} (2 at a time, not interleaved)"
            )
    if "full_cells_unpinned_spread" in v:
        f = v["full_cells_unpinned_spread"]
        print(
            f"full-length cells, unpinned code paths: final loss up to {f['max_final_loss_diff']:.2e}, val_average up "
            f"to {f['max_val_average_diff']:.2f}, average up to {f['max_average_diff']:.2f} points"
        )
    print(f"benchmark wall time {results['seconds']:.0f} s")


def print_full_cells(full: list[dict]) -> None:
    cells = list(full[0]["cells"])
    print(f"\nfull-length demo cells, fresh towers built under each setting; |diff| against {full[0]['setting']!r}:")
    rows = []
    for r in full:
        row = {
            "setting": r["setting"],
            "towers_same": r["towers_same"],
            "max_final_loss_diff": r["max_final_loss_diff"],
            "max_val_average_diff": r["max_val_average_diff"],
            "max_average_diff": r["max_average_diff"],
        }
        for cell in cells:
            row[cell] = r["cells"][cell]["scores"]["average"]
        rows.append(row)
    columns = [
        ("setting", "setting", "{}"),
        ("towers_same", "towers same", "{}"),
        ("max_final_loss_diff", "|d loss|", "{:.2e}"),
        ("max_val_average_diff", "|d val_avg|", "{:.2f}"),
        ("max_average_diff", "|d average|", "{:.2f}"),
    ] + [(cell, f"{cell} Average", "{:.2f}") for cell in cells]
    print(table(rows, columns))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings, 20 steps, one repeat")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps per run (default 60; quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per setting (default 2; quick 1)")
    parser.add_argument("--loss", default="clip")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DEMO_DATA))
    parser.add_argument("--only", nargs="+", default=None, help="only these settings (and the machine default)")
    parser.add_argument("--no-pretrain", action="store_true", help="skip the data and pretrained-towers checks")
    parser.add_argument("--full-pretrain", action="store_true", help="build the towers with the demo's own settings")
    parser.add_argument(
        "--full", action="store_true", help="also make demo's cells at full length, fresh towers per setting (~20 min)"
    )
    parser.add_argument(
        "--towers-check",
        action="store_true",
        help="also rebuild the data set's full towers at 1 and 2 threads against its cached file (~4 min)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(
        args.quick,
        args.out,
        args.max_steps,
        args.repeats,
        args.loss,
        args.optimizer,
        args.seed,
        args.data,
        not args.no_pretrain,
        args.full_pretrain,
        args.only,
        args.full,
        args.towers_check,
    )
    print_results(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
