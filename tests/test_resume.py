"""Resume, proven to be a resume: each rerun must say it resumed from the checkpoint's step, train only the
steps after it, and end exactly like an uninterrupted run. A restart from scratch (deterministic, so it would
end with the same numbers) fails these tests: ``make test-mutation-resume`` checks that.

Every loss that carries state or learned parameters (SogCLR, iSogCLR and OnlineCLR buffers, SigLIP's scale
and bias) is cut mid-epoch and at an epoch's last step, by SIGTERM in-process; the command line is cut by
``kill -9`` at a known step, by SIGINT (exit code 130) and by a second signal.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_DEMO, assert_same_weights

import clipstudy.engine.train as train_mod
from clipstudy.engine.checkpoint import checkpoint_paths, load_latest, load_verified
from clipstudy.engine.config import make_config
from clipstudy.engine.runstate import StopRequest
from clipstudy.engine.train import train

TIMING = {"wall_time_s", "train_samples_per_s", "peak_memory_mb", "eval_time", "git_commit"}
STEPS_PER_EPOCH = TINY_DEMO["train_size"] // 16  # smoke batch size 16
EPOCHS = 2  # the smoke profile's
STATEFUL_LOSSES = ["sogclr", "isogclr", "onlineclr", "siglip"]


def smoke(data, out, **kw):
    return make_config("smoke", data=str(data), out=str(out), **{"threads": 1, **kw})


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def newest_state(run: Path) -> dict:
    state, _, _ = load_latest(Path(run) / "checkpoints")
    assert state is not None, f"no valid checkpoint in {run}"
    return state


def assert_same_run(run: Path, reference: Path) -> None:
    """Same metrics, weights, loss state, optimizer state, schedule, history and evaluations."""
    got, want = json.loads((run / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text())
    assert comparable(got) == comparable(want)
    assert_same_weights(newest_state(run), newest_state(reference))
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "history.csv").drop(columns=["samples_per_s", "data_time", "step_time"]),
        pd.read_csv(reference / "history.csv").drop(columns=["samples_per_s", "data_time", "step_time"]),
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "epochs.csv").drop(columns=["eval_time"]),
        pd.read_csv(reference / "epochs.csv").drop(columns=["eval_time"]),
    )


def assert_finished_checkpoint(run: Path, step: int) -> dict:
    """The newest checkpoint is ``ckpt-<step>.pt`` with its digest, it verifies, and no result was written."""
    newest = checkpoint_paths(run / "checkpoints")[0]
    assert newest.name == f"ckpt-{step:08d}.pt"
    assert newest.with_name(newest.name + ".sha256").is_file()
    state = load_verified(newest)
    assert state["global_step"] == step and state["history"][-1]["step"] == step
    assert not (run / "metrics.json").exists(), "the run finished: nothing was interrupted"
    return state


def assert_resumed(stderr: str, run: Path, step: int) -> None:
    """The rerun announced a resume from ``ckpt-<step>`` and recorded it in config.json."""
    assert re.search(rf"resumed from \S*ckpt-{step:08d}\.pt \(epoch \d+, batch \d+, step {step}\)", stderr), stderr
    assert len(json.loads((run / "config.json").read_text()).get("resumes", [])) == 1


class StepCounter:
    """Counts ``train_step`` calls; sends ``sig`` to this process after step ``signal_at`` of this session."""

    def __init__(self, monkeypatch, signal_at: int | None = None, sig=signal.SIGTERM):
        self.calls, self.signal_at, self.sig, self.real = 0, signal_at, sig, train_mod.train_step
        monkeypatch.setattr(train_mod, "train_step", self)

    def __call__(self, run, batch):
        result = self.real(run, batch)
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.sig)
        return result


@pytest.fixture(scope="module")
def reference_of(tmp_path_factory, demo_data_dir):
    """The uninterrupted smoke run of a loss (made once per loss)."""
    made: dict[str, Path] = {}

    def get(loss: str) -> Path:
        if loss not in made:
            out = tmp_path_factory.mktemp(f"reference-{loss}") / "run"
            assert train(smoke(demo_data_dir, out, loss=loss), progress=False)["status"] == "completed"
            made[loss] = out
        return made[loss]

    return get


@pytest.mark.parametrize(
    "cut", [pytest.param(STEPS_PER_EPOCH - 1, id="mid-epoch"), pytest.param(STEPS_PER_EPOCH, id="last-step-of-epoch")]
)
@pytest.mark.parametrize("loss", STATEFUL_LOSSES)
def test_sigterm_then_rerun_resumes_and_equals_uninterrupted(
    reference_of, demo_data_dir, tmp_path, monkeypatch, capsys, loss, cut
):
    reference = reference_of(loss)
    run = tmp_path / "run"
    config = smoke(demo_data_dir, run, loss=loss)
    StepCounter(monkeypatch, signal_at=cut)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    saved = assert_finished_checkpoint(run, cut)
    assert [p.name for p in checkpoint_paths(run / "checkpoints")] == [f"ckpt-{cut:08d}.pt"]
    assert (saved["epoch"], saved["batch_in_epoch"]) == (0, cut)
    capsys.readouterr()

    rerun = StepCounter(monkeypatch)
    assert train(config, progress=False)["status"] == "completed"
    assert rerun.calls == EPOCHS * STEPS_PER_EPOCH - cut  # only the steps after the checkpoint
    assert_resumed(capsys.readouterr().err, run, cut)
    assert_same_run(run, reference)
    if loss == "siglip":  # the learned scale and bias crossed the resume: restored, then trained on
        final = newest_state(run)["loss"]
        for name, initial in (("logit_scale", math.log(10.0)), ("logit_bias", -10.0)):
            assert saved["loss"][name].item() != initial and final[name].item() != saved["loss"][name].item()


# ------------------------------------------------------------ the command line, cut at a known step
# The CLI with train_step wrapped: before step BLOCK_AT it writes READY and waits (at most a minute) for GO,
# so a test signals or kills the process at an exact point of the run.
BLOCKING_CLI = """
import os, sys, time
from pathlib import Path
import clipstudy.engine.train as t
ready, go, block_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
real, calls = t.train_step, [0]
def blocking_step(run, batch):
    calls[0] += 1
    if calls[0] == block_at:
        ready.write_text(str(os.getpid()))
        deadline = time.time() + 60
        while not go.exists() and time.time() < deadline:
            time.sleep(0.02)
    return real(run, batch)
t.train_step = blocking_step
from clipstudy.__main__ import main
sys.exit(main(sys.argv[4:]))
"""


def cli_args(data, out, loss="onlineclr", epochs=EPOCHS):
    return [
        "train",
        "--profile",
        "smoke",
        "--data",
        str(data),
        "--out",
        str(out),
        "--loss",
        loss,
        "--epochs",
        str(epochs),
        "--threads",
        "1",
        "--no-progress",
    ]


def start_blocked(tmp_path, block_at: int, args) -> tuple[subprocess.Popen, Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKING_CLI, str(ready), str(go), str(block_at), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ready.exists() and proc.poll() is None, proc.communicate()
    return proc, go


@pytest.mark.parametrize(
    "block_at, resume_at",
    [
        # right after ckpt-4 (the in-process SIGTERM tests cover this boundary in the fast suite)
        pytest.param(STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH, id="at-epoch-boundary", marks=pytest.mark.faults),
        pytest.param(STEPS_PER_EPOCH + 3, STEPS_PER_EPOCH, id="mid-epoch"),  # steps 5, 6 lost
    ],
)
def test_kill9_of_the_cli_then_rerun_resumes(reference_of, demo_data_dir, tmp_path, block_at, resume_at):
    """``kill -9`` of ``clipstudy train`` while it waits before step ``block_at``; the rerun resumes from the
    newest finished checkpoint and ends like an uninterrupted run."""
    args = cli_args(demo_data_dir, tmp_path / "run")
    proc, _ = start_blocked(tmp_path, block_at, args)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_finished_checkpoint(tmp_path / "run", resume_at)
    rerun = subprocess.run([sys.executable, "-m", "clipstudy", *args], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_resumed(rerun.stderr, tmp_path / "run", resume_at)
    assert_same_run(tmp_path / "run", reference_of("onlineclr"))


def test_sigint_of_the_cli_checkpoints_exits_130_and_the_rerun_resumes(demo_data_dir, tmp_path):
    args = cli_args(demo_data_dir, tmp_path / "run", epochs=1)
    proc, go = start_blocked(tmp_path, 3, args)
    proc.send_signal(signal.SIGINT)  # arrives while step 3 waits: the step finishes, then the checkpoint
    go.write_text("")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert re.search(
        r"^stopped: interrupted; checkpoint saved in \S*checkpoints: rerun the same command to resume$", err, re.M
    ), err
    assert "Traceback" not in err and out == ""
    assert_finished_checkpoint(tmp_path / "run", 3)
    rerun = subprocess.run([sys.executable, "-m", "clipstudy", *args], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_resumed(rerun.stderr, tmp_path / "run", 3)
    assert json.loads(rerun.stdout)["global_step"] == STEPS_PER_EPOCH


@pytest.mark.faults
def test_a_second_signal_stops_at_once_without_a_checkpoint(demo_data_dir, tmp_path):
    args = cli_args(demo_data_dir, tmp_path / "run", epochs=1)
    proc, go = start_blocked(tmp_path, 3, args)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the first is handled (a flag) while the step waits; the second interrupts the wait
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "received signal 15: checkpointing after this step" in err and "stopped:" in err
    assert checkpoint_paths(tmp_path / "run" / "checkpoints") == []  # stopped inside step 3: nothing saved
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_stop_request_flags_the_first_signal_raises_on_the_second_and_restores_handlers(caplog):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop, caplog.at_level("WARNING", logger="clipstudy.engine.train"):
        assert stop.signal is None
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:  # would abort the whole pytest session, not fail this test
            pytest.fail("the first signal raised KeyboardInterrupt instead of setting the flag")
        assert stop.signal == signal.SIGINT
        assert [r.getMessage() for r in caplog.records] == [
            f"received signal {int(signal.SIGINT)}: checkpointing after this step"
        ]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_torch_global_state_is_restored_after_in_process_training(demo_data_dir, tmp_path):
    from conftest import torch_global_state

    torch.use_deterministic_algorithms(False)
    threads = torch.get_num_threads()
    with torch_global_state():
        train(smoke(demo_data_dir, tmp_path / "run", max_steps=1, threads=threads + 1), progress=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads + 1
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
