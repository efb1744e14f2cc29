"""The notebooks as a person runs them in JupyterLab (papermill, the kernel in ``notebooks/``), and ``make lab``.

* the analysis notebook opened with no runs says so in one line and writes nothing; with runs it shows them
  and still writes nothing (only ``python -m clipstudy report`` writes the tables);
* the training notebook by hand, smoke profile on a full-size demo set: seconds, no warning box, and its
  first output is where the run landed, how long it took and its scores;
* a run's config.json and metrics.json record the same commit, even when the checkout changes while it trains;
* ``make lab`` as root, on a port given in ``LAB_ARGS``, opens untracked working copies of the notebooks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from clipstudy.engine import records

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def run_notebook(name: str, output: Path, parameters: dict | None = None, **env) -> subprocess.CompletedProcess:
    """papermill on ``notebooks/NAME`` with the kernel in ``notebooks/`` (as JupyterLab starts it)."""
    command = [sys.executable, "-m", "papermill", name, str(output), "--no-progress-bar"]
    if parameters:
        command += ["-y", json.dumps(parameters)]
    return subprocess.run(
        command, cwd=NOTEBOOKS, capture_output=True, text=True, timeout=280, env={**os.environ, **env}
    )


def outputs_of(notebook: Path) -> list[list[dict]]:
    """Each code cell's outputs, in order (papermill's own error banner cell left out)."""
    cells = nbformat.read(notebook, as_version=4).cells
    return [
        c.outputs
        for c in cells
        if c.cell_type == "code" and "papermill-error-cell-tag" not in c.metadata.get("tags", [])
    ]


def output_text(output: dict) -> str:
    if output["output_type"] == "stream":
        return output["text"]
    if output["output_type"] == "error":
        return "\n".join(output["traceback"])
    data = output.get("data", {})
    return str(data.get("text/markdown") or data.get("text/plain") or "")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder (CLIPSTUDY_ROOT) holding the committed reports/demo/ and no runs."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "reports" / "demo", root / "reports" / "demo")
    return root


# ------------------------------------------------------------------ analysis.ipynb
def test_analysis_notebook_without_runs_writes_nothing_and_says_so_in_one_line(project, tmp_path):
    before = snapshot(project)
    done = run_notebook("analysis.ipynb", tmp_path / "out.ipynb", CLIPSTUDY_ROOT=str(project))
    assert snapshot(project) == before, "the notebook changed the committed reports"
    assert done.returncode != 0  # Run All stops at the first code cell
    errors = [o for cell in outputs_of(tmp_path / "out.ipynb") for o in cell if o["output_type"] == "error"]
    assert len(errors) == 1 and len(errors[0]["traceback"]) == 1, errors
    line = errors[0]["traceback"][0]
    assert line.startswith("nothing to report: ") and str(project / "reports" / "runs" / "demo") in line
    assert "make demo" in line and "train.ipynb" in line


def test_analysis_notebook_by_hand_shows_the_runs_and_writes_nothing(project, tmp_path):
    from test_report import write_fixture_runs

    write_fixture_runs(project / "reports" / "runs" / "demo")
    before = snapshot(project)
    done = run_notebook("analysis.ipynb", tmp_path / "out.ipynb", CLIPSTUDY_ROOT=str(project))
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(project) == before, "the notebook wrote into the project"
    first = output_text(outputs_of(tmp_path / "out.ipynb")[1][0])  # the cell after the parameters
    assert first.startswith("**Profile `demo`**: 9 runs in 5 optimizer x loss cells") and "Shown only" in first


# ------------------------------------------------------------------ train.ipynb
@pytest.fixture(scope="module")
def full_demo_data(tmp_path_factory) -> Path:
    """A demo set of the default size (what `make demo-data` makes), about 4 s to generate."""
    from clipstudy.data.demo import make_demo_data

    out = tmp_path_factory.mktemp("full_demo")
    make_demo_data(out)
    return out


def test_train_notebook_smoke_takes_seconds_and_shows_where_how_long_and_the_scores_first(full_demo_data, tmp_path):
    run_dir = tmp_path / "run"
    params = {"profile": "smoke", "data": str(full_demo_data), "out": str(run_dir), "overrides": {"threads": 1}}
    started = time.perf_counter()
    done = run_notebook("train.ipynb", tmp_path / "out.ipynb", params)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps_total"] <= 40
    assert metrics["wall_time_s"] < 60 and took < 150, (metrics["wall_time_s"], took)
    cells = outputs_of(tmp_path / "out.ipynb")
    every_output = "\n".join(output_text(o) for cell in cells for o in cell)
    assert "TqdmWarning" not in every_output and "IProgress" not in every_output
    # the training cell's first output: the line that said where the run goes, updated when it ended
    training = next(cell for cell in cells if any("Run `" in output_text(o) for o in cell))
    first = output_text(training[0])
    assert first == records.run_summary(metrics, run_dir)
    assert first.startswith(f"Run `{run_dir}`: completed in ") and "Scores (%): TR@1 " in first


def test_ipywidgets_is_a_locked_dependency():
    """tqdm.auto draws its notebook bars with ipywidgets; without it every run shows a TqdmWarning box."""
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "ipywidgets" in dependencies
    assert "\nipywidgets==" in (ROOT / "requirements" / "lock.txt").read_text()


# ------------------------------------------------------------------ records
def test_config_and_metrics_record_the_commit_the_run_started_with(tmp_path, monkeypatch):
    """The checkout turning dirty during a run (an autosaved notebook) does not make the two records disagree."""
    import torch

    from clipstudy.engine.config import make_config

    commits = iter(["abc123", "abc123-dirty", "abc123-dirty"])
    monkeypatch.setattr(records, "git_commit", lambda: next(commits))
    config = make_config("smoke", data=str(tmp_path / "data"), out=str(tmp_path / "run"))
    digest = {"digest": "f" * 64}
    (tmp_path / "run").mkdir()
    records.write_run_config(
        tmp_path / "run", config, device=torch.device("cpu"), world_size=1, command=["x"], fingerprint=digest
    )
    metrics = records.run_metrics(
        config,
        status=records.COMPLETED,
        final_scores={},
        diverged_at_step=None,
        global_step=1,
        steps_total=1,
        truncated=False,
        epochs_completed=1,
        wall_time_s=1.0,
        train_samples_per_s=1.0,
        peak_memory_mb=0.0,
        skipped_images=0,
        fingerprint=digest["digest"],
    )
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["git_commit"]
    assert recorded == metrics["git_commit"] == "abc123"


# ------------------------------------------------------------------ make lab
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_make_lab_serves_untracked_working_copies_on_the_given_port(tmp_path):
    lab_dir = NOTEBOOKS / f".lab-test-{os.getpid()}"
    port = free_port()
    log = (tmp_path / "lab.log").open("w")
    # -o: never reinstall here (the environment is set up); the test is about the lab target
    lab = subprocess.Popen(
        ["make", "-o", ".venv/.clipstudy-installed", "lab", f"LAB_DIR={lab_dir.relative_to(ROOT)}",
         f"LAB_ARGS=--no-browser --ip 127.0.0.1 --port {port} --ServerApp.token=test"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")},
    )  # fmt: skip
    try:
        deadline, answer = time.monotonic() + 120, None
        while answer is None and time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token=test", timeout=5) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, (tmp_path / "lab.log").read_text()[-3000:]
        assert {item["name"] for item in answer["content"]} == {"train.ipynb", "analysis.ipynb"}
        for name in ("train.ipynb", "analysis.ipynb"):
            assert (lab_dir / name).read_bytes() == (NOTEBOOKS / name).read_bytes()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--ignored=no"], cwd=ROOT, capture_output=True, text=True
        )
        assert lab_dir.name not in status.stdout  # untracked and ignored: editing them dirties nothing
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
        shutil.rmtree(lab_dir, ignore_errors=True)
