"""Shared test fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

# A tiny demo benchmark: small enough to generate in about a second, big
# enough for a few training steps and every evaluation.
TINY_DEMO = dict(seed=0, image_size=32, train_size=64, retrieval_size=16, zeroshot_per_class=3, zeroshot_classes=4)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """A tiny demo data set (``TINY_DEMO`` parameters, demo layout), generated once per session.

    Shared by many tests: treat it as read-only; copy it (``shutil.copytree``)
    before changing anything.
    """
    from clipstudy.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo_data")
    make_demo_data(out, **TINY_DEMO)
    return out
