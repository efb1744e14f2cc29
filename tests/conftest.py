"""Shared test fixtures."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# A tiny demo benchmark: small enough to generate in about a second, big
# enough for a few training steps and every evaluation.
TINY_DEMO = dict(seed=0, image_size=32, train_size=64, retrieval_size=16, zeroshot_per_class=3, zeroshot_classes=4)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """A tiny demo data set (``TINY_DEMO`` parameters, demo layout), generated once per session.

    Shared by many tests: treat it as read-only; copy it (``shutil.copytree``)
    before changing anything.
    """
    from clipstudy.data.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo_data")
    make_demo_data(out, **TINY_DEMO)
    return out


@contextlib.contextmanager
def torch_global_state():
    """Restore torch's process-wide settings on exit: in-process ``train()`` sets deterministic mode, the thread
    count and cuDNN benchmark globally, and a later test must not depend on which test ran before it."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    try:
        yield
    finally:
        deterministic, warn_only, threads, benchmark, cublas = saved
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@pytest.fixture(autouse=True)
def restore_torch_global_state():
    with torch_global_state():
        yield


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold the same model, loss state, optimizer state, step and schedule, bit for bit."""
    for part in ("model", "loss", "optimizer"):
        flat_a, flat_b = state_tensors(a[part]), state_tensors(b[part])
        assert flat_a.keys() == flat_b.keys(), part
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), f"{part}{key} differs"
    assert a["global_step"] == b["global_step"] and a["scheduler"] == b["scheduler"]


def state_tensors(obj, prefix=""):
    """Every tensor in a nested state, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in state_tensors(value, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in state_tensors(value, f"{prefix}[{i}]").items()}
    return {}
