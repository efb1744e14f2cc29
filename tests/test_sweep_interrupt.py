"""Ctrl-C stops a sweep: queued cells never start and the running one checkpoints (a real terminal's SIGINT
reaches the sweep's process group only; each notebook kernel runs in a session of its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.faults
def test_ctrl_c_stops_the_queue_and_checkpoints_the_running_cell(demo_data_dir, tmp_path):
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "clipstudy", "sweep", "--profile", "smoke", "--data", str(demo_data_dir)]
    argv += ["--optimizers", "adamw", "--losses", "clip,sogclr,cyclip", "--runs", str(runs), "--set", "epochs=30"]
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        # as in a terminal: SIGINT at its default, also when this test runs from a background job (a shell
        # without job control starts those with SIGINT ignored, and Python then never raises KeyboardInterrupt)
        sweep = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    first = runs / "adamw-clip-s0"
    deadline = time.time() + 240
    while not list((first / "checkpoints").glob("ckpt-*.pt")) and time.time() < deadline:  # training has begun
        time.sleep(0.5)
    assert sweep.poll() is None, log.read_text()
    started = time.time()
    os.killpg(sweep.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: to the sweep's process group
    code = sweep.wait(timeout=120)
    assert code == 130 and time.time() - started < 90, log.read_text()
    assert "queued cells were not started" in log.read_text()
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["adamw-clip-s0"]  # nothing else started
    record = json.loads((first / "metrics.json").read_text())
    assert record["status"] == "interrupted", record
