"""Folders come from clipstudy.paths, not from the current directory; an installed clipstudy works anywhere."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from clipstudy import paths
from clipstudy.engine.build import run_directory
from clipstudy.engine.config import make_config
from clipstudy.study.sweep import plan_cells

ROOT = Path(__file__).resolve().parent.parent


def test_project_folders_are_the_checkouts_whatever_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.project_root() == ROOT
    assert paths.runs_dir("demo") == ROOT / "reports" / "runs" / "demo"
    assert paths.demo_data_dir() == ROOT / "data" / "demo"
    assert paths.notebook("train.ipynb") == ROOT / "notebooks" / "train.ipynb"
    # the profile's relative data folder is the project's, not the current directory's
    assert make_config("demo").data == str(ROOT / "data" / "demo")


def test_relative_and_absolute_spellings_are_one_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spelled = [
        make_config("demo"),
        make_config("demo", data="data/demo"),
        make_config("demo", data=str(ROOT / "data" / "demo")),
        make_config("demo", data="./data/x/../demo"),
    ]
    assert all(c.to_dict() == spelled[0].to_dict() for c in spelled)
    # a path the caller gives is relative to where the caller stands, stored absolute
    monkeypatch.chdir(tmp_path)
    config = make_config("smoke", data="mydata", out="runs/x", tokenizer="tok")
    assert (config.data, config.out, config.tokenizer) == tuple(str(tmp_path / p) for p in ("mydata", "runs/x", "tok"))


def test_default_run_directory_is_where_the_sweep_and_the_report_look(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = make_config("smoke", optimizer="sgd", loss="clip")
    [cell] = plan_cells("smoke", optimizers=["sgd"], losses=["clip"])
    assert run_directory(config) == cell.out == paths.runs_dir("smoke") / "sgd-clip-s0"


def _papermill_train(cwd: Path, data: Path, label: str) -> subprocess.CompletedProcess:
    notebook = ROOT / "notebooks" / "train.ipynb"
    params = {
        "profile": "smoke",
        "label": label,
        "data": str(data),
        "progress": False,
        "overrides": {"epochs": 1, "max_steps": 2, "threads": 1},
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            os.path.relpath(notebook, cwd),
            str(cwd / "out.ipynb"),
            "-y",
            json.dumps(params),
            "--no-progress-bar",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("where", ["notebooks", "elsewhere"])
def test_train_notebook_writes_its_run_under_the_projects_runs(demo_data_dir, tmp_path, where):
    """As JupyterLab runs it (from notebooks/) and from an unrelated folder: the run lands in reports/runs/."""
    cwd = ROOT / "notebooks" if where == "notebooks" else tmp_path / "x"
    cwd.mkdir(exist_ok=True)
    label = f"pathtest-{uuid.uuid4().hex[:8]}"
    run_dir = paths.runs_dir("smoke") / f"{label}-clip-s0"
    try:
        done = _papermill_train(cwd, demo_data_dir, label)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["global_step"] == 2
        assert json.loads((run_dir / "config.json").read_text())["config"]["data"] == str(demo_data_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        (cwd / "out.ipynb").unlink(missing_ok=True)


@pytest.mark.slow
def test_installed_clipstudy_runs_train_and_report_from_another_directory(demo_data_dir, tmp_path):
    """A non-editable install (its own venv, reusing this environment's dependencies) needs no checkout."""
    source = tmp_path / "src"
    everywhere = shutil.ignore_patterns("*.egg-info", "__pycache__")
    at_root = {".venv", ".git", "reports", "data", "build", "tests"}  # clipstudy/data is the package's own

    def ignore(folder, names):
        return everywhere(folder, names) | (at_root & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, source, ignore=ignore)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site_dir = next((venv / "lib").glob("python3*/site-packages"))
    here = next(p for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir())
    # the dependencies come from this environment; the venv's own old setuptools would shadow its newer one
    (site_dir / "zz_dependencies.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    shutil.rmtree(next(site_dir.glob("setuptools")), ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", paths.ROOT_VARIABLE)}
    jupyter = tmp_path / "jupyter"  # nbconvert's templates live in the dependencies' prefix
    jupyter.mkdir()
    (jupyter / "nbconvert").symlink_to(Path(sys.prefix) / "share" / "jupyter" / "nbconvert")
    env["JUPYTER_PATH"] = str(jupyter)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)],
        check=True,
        capture_output=True,
        env=env,
        cwd=tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def clipstudy(*args):
        return subprocess.run(
            [str(python), "-m", "clipstudy", *args], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300
        )

    where = clipstudy("train", "--profile", "smoke", "--max_steps", "1")
    assert where.returncode == 2 and "pass the paths explicitly" in where.stderr and "Traceback" not in where.stderr
    located = subprocess.run(
        [str(python), "-c", "import clipstudy; print(clipstudy.__file__)"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert str(site_dir) in located.stdout
    trained = clipstudy(
        "train",
        "--profile",
        "smoke",
        "--data",
        str(demo_data_dir),
        "--out",
        "runs/cell",
        "--epochs",
        "1",
        "--max_steps",
        "2",
        "--threads",
        "1",
        "--no-progress",
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((elsewhere / "runs" / "cell" / "metrics.json").read_text())["status"] == "completed"
    reported = clipstudy("report", "--profile", "smoke", "--runs", "runs", "--out", "report")
    assert reported.returncode == 0, reported.stderr[-2000:]
    assert (elsewhere / "report" / "report.html").is_file()
