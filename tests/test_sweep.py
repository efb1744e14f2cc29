"""The sweep through papermill: runs the training notebook per cell, skips finished cells,
resumes interrupted ones, records failures and divergence and goes on."""

import json
import os
import re
import signal
from pathlib import Path

import pytest

import clipstudy.engine.train as train_mod
from clipstudy.__main__ import main as clipstudy_main
from clipstudy.engine.config import ConfigError, make_config
from clipstudy.engine.fingerprint import fingerprint
from clipstudy.fileio import SWEEP_LOCK_NAME, cell_lock
from clipstudy.study.cells import cell_state, record_state, run_cell, summary_line
from clipstudy.study.sweep import main as sweep_main
from clipstudy.study.sweep import plan_cells, run_sweep

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"  # not the working directory's


def test_plan_validates_every_cell_before_running(tmp_path):
    cells = plan_cells(
        "smoke",
        optimizers=["adamw", "adam-nol2"],
        losses=["clip", "sogclr"],
        seeds=[0, 1],
        lr={"adamw": 1e-3},
        overrides={"data": str(tmp_path)},
        runs_root=tmp_path,
    )
    assert [c.name for c in cells][:3] == ["adamw-clip-s0", "adamw-clip-s1", "adamw-sogclr-s0"]
    assert len(cells) == 8
    nol2 = [c for c in cells if c.label == "adam-nol2"][0]
    assert nol2.config.optimizer == "adam" and nol2.config.weight_decay == 0.0
    assert cells[0].config.lr == 1e-3 and nol2.config.lr == make_config("smoke").lr
    with pytest.raises(ConfigError, match="loss"):
        plan_cells("smoke", losses=["nope"], overrides={"data": str(tmp_path)}, runs_root=tmp_path)
    with pytest.raises(ConfigError, match="epochs"):
        plan_cells("smoke", overrides={"data": str(tmp_path), "epochs": "x"}, runs_root=tmp_path)


def test_dry_run_lists_states(tmp_path, capsys, demo_data_dir):
    code = clipstudy_main(
        [
            "sweep",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(tmp_path),
            "--optimizers",
            "adamw",
            "--losses",
            "clip,vicreg",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "adamw-clip-s0" in out and "pending" in out and "2 cells" in out
    assert clipstudy_main(["sweep", "--profile", "smoke", "--losses", "bogus", "--dry-run"]) == 2


def write_cell_record(run, status=None, checkpoint=None, config=None, **metrics):
    run.mkdir(parents=True)
    if config is not None:  # the fingerprint the run would have recorded, so it is not stale
        (run / "config.json").write_text(json.dumps({"fingerprint": fingerprint(config)}))
    if status:
        (run / "metrics.json").write_text(json.dumps({"status": status, **metrics}))
    if checkpoint:
        (run / "checkpoints").mkdir()
        for step in (checkpoint - 1, checkpoint):
            (run / "checkpoints" / f"ckpt-{step:08d}.pt").write_bytes(b"")


def test_dry_run_lists_each_cells_state_and_runs_nothing(tmp_path, capsys, demo_data_dir):
    """Every state cell_state tells apart, as the dry run prints it; a live lock wins over any file."""
    runs = tmp_path / "runs"
    planned = {
        cell.name: cell.config
        for cell in plan_cells(
            "smoke",
            optimizers=["adamw", "sgd"],
            losses=["clip"],
            overrides={"data": str(demo_data_dir)},
            runs_root=runs,
        )
    }
    planned.update(
        {
            cell.name: cell.config
            for cell in plan_cells(
                "smoke",
                optimizers=["adamw"],
                losses=["sogclr", "cyclip", "vicreg", "onlineclr", "isogclr", "siglip"],
                overrides={"data": str(demo_data_dir)},
                runs_root=runs,
            )
        }
    )

    def write_cell(run, *args, **kwargs):
        return write_cell_record(run, *args, config=planned[run.name], **kwargs)

    write_cell(runs / "adamw-clip-s0", "completed", average=12.345)
    write_cell(runs / "adamw-sogclr-s0", "completed")  # a result without the average
    write_cell(runs / "adamw-cyclip-s0", "diverged", diverged_at_step=7)
    write_cell(runs / "adamw-vicreg-s0", "failed", error="DataError: " + "x" * 200)
    write_cell(runs / "adamw-onlineclr-s0", checkpoint=12)
    write_cell(runs / "adamw-isogclr-s0", "completed", average=1.0)  # finished, yet a process holds its lock
    write_cell(runs / "adamw-siglip-s0", checkpoint=3)  # held by a sweep
    write_cell(runs / "sgd-clip-s0", "failed")  # a failure record without its error
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    with cell_lock(runs / "adamw-isogclr-s0"), cell_lock(runs / "adamw-siglip-s0", SWEEP_LOCK_NAME):
        code = sweep_main(
            [
                "--profile",
                "smoke",
                "--data",
                str(demo_data_dir),
                "--runs",
                str(runs),
                "--optimizers",
                "adamw,sgd",
                "--losses",
                "clip,sogclr,cyclip,vicreg,onlineclr,isogclr,siglip",
                "--dry-run",
            ]
        )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    states = {line.split()[0]: line.split(None, 1)[1].strip() for line in out[:-1]}
    assert states["adamw-clip-s0"] == "done (average 12.35)"
    assert states["adamw-sogclr-s0"] == "done (completed)"
    assert states["adamw-cyclip-s0"] == "diverged (at step 7)"
    assert states["adamw-vicreg-s0"] == "failed (DataError: " + "x" * 109 + ")"  # cut at 120 characters
    assert states["adamw-onlineclr-s0"] == "partial (resumes from ckpt-00000012.pt)"
    assert states["adamw-isogclr-s0"] == states["adamw-siglip-s0"] == "running (locked by a live process)"
    assert states["sgd-clip-s0"] == "failed" and states["sgd-sogclr-s0"] == "pending" and len(states) == 14
    assert out[-1] == f"14 cells in {runs.resolve()}"
    assert sorted(p.relative_to(runs) for p in runs.rglob("*") if p.name not in (".lock", SWEEP_LOCK_NAME)) == before
    assert clipstudy_main(["sweep", "--profile", "smoke", "--losses", "bogus", "--dry-run"]) == 2


def test_record_state_tells_stale_and_cut_runs_apart_and_needs_a_config_for_either(tmp_path, demo_data_dir):
    asked = make_config("smoke", data=str(demo_data_dir), out=str(tmp_path / "x"), lr=2e-3)
    cut = {"average": 5.0, "truncated": True, "steps_completed": 4, "steps_total": 10}
    write_cell_record(tmp_path / "cut", "completed", config=asked, **cut)
    assert record_state(tmp_path / "cut", asked) == ("partial", "stopped at step 4 of 10; continues")
    assert record_state(
        tmp_path / "cut", make_config("smoke", data=str(demo_data_dir), out=str(tmp_path / "x"), lr=2e-3, max_steps=4)
    ) == ("done", "average 5.00, stopped at step 4 of 10")
    assert record_state(tmp_path / "cut") == ("done", "average 5.00, stopped at step 4 of 10")  # no config: as recorded
    other = make_config("smoke", data=str(demo_data_dir), out=str(tmp_path / "x"), lr=5e-2)
    write_cell_record(tmp_path / "finished", "completed", config=other, average=7.0)
    assert record_state(tmp_path / "finished", asked) == ("stale", "lr 0.05 -> 0.002")
    assert record_state(tmp_path / "finished") == ("done", "average 7.00")
    write_cell_record(tmp_path / "started", checkpoint=3, config=other)  # checkpoints, no result yet
    assert record_state(tmp_path / "started", asked) == ("stale", "lr 0.05 -> 0.002")
    assert record_state(tmp_path / "started") == ("partial", "resumes from ckpt-00000003.pt")
    assert cell_state(tmp_path / "finished", asked) == ("stale", "lr 0.05 -> 0.002")  # the sweep's entry point
    assert cell_state(tmp_path / "started") == ("partial", "resumes from ckpt-00000003.pt")
    write_cell_record(tmp_path / "broken", "failed", config=other, error="E")  # a failure is not compared
    assert record_state(tmp_path / "broken", asked) == ("failed", "E")
    assert record_state(tmp_path / "absent", asked) == ("pending", "")


def test_a_cell_locked_by_another_sweep_is_skipped_not_trained(tmp_path, capsys, demo_data_dir):
    (cell,) = plan_cells(
        "smoke", optimizers=["adamw"], losses=["clip"], overrides={"data": str(demo_data_dir)}, runs_root=tmp_path
    )
    cell.out.mkdir()
    with cell_lock(cell.out, SWEEP_LOCK_NAME):
        assert run_cell(cell) == {"status": "busy", "cell": cell.name, "sweep_wall_s": 0.0}
        assert summary_line(cell, run_cell(cell)) == f"{cell.name:<28} skipped (another sweep is running it)"
        results = run_sweep([cell], progress=False)
    assert results == {} and f"{cell.name:<28} skipped (running in another process)" in capsys.readouterr().out
    assert sorted(p.name for p in cell.out.iterdir()) == [SWEEP_LOCK_NAME]  # nothing trained, nothing written


def test_sweep_skip_resume_and_continue_after_failure(tmp_path, demo_data_dir, monkeypatch, capsys):
    runs = tmp_path / "runs"
    variants = {
        "broken": {"optimizer": "adamw", "retrieval_ann": str(tmp_path / "missing.json")},
        "boom": {"optimizer": "sgd", "lr": 1e12, "warmup_steps": 0},
    }
    common = dict(seeds=[0], overrides={"data": str(demo_data_dir), "threads": 1}, variants=variants, runs_root=runs)
    # An interrupted cell: SIGTERM mid-run leaves a checkpoint and no metrics.
    (partial,) = plan_cells("smoke", optimizers=["adamw"], losses=["sogclr"], **common)
    original = train_mod.train_step
    calls = {"n": 0}

    def step_then_signal(run, batch):
        out = original(run, batch)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(partial.config, progress=False)
    monkeypatch.setattr(train_mod, "train_step", original)
    assert cell_state(partial.out)[0] == "partial"

    cells = plan_cells("smoke", optimizers=["adamw", "broken", "boom"], losses=["sogclr"], **common)
    results = run_sweep(cells, progress=False)
    out = capsys.readouterr().out
    assert results["adamw-sogclr-s0"]["status"] == "completed"
    assert results["broken-sogclr-s0"]["status"] == "failed" and "missing.json" in results["broken-sogclr-s0"]["error"]
    assert results["boom-sogclr-s0"]["status"] == "diverged"
    assert "FAILED" in out and "DIVERGED" in out
    # the interrupted cell resumed from its checkpoint (the executed notebook says so) instead of restarting
    executed = (partial.out / "train.ipynb").read_text()
    assert "resumed from" in executed and "ckpt-00000005.pt" in executed
    assert json.loads((partial.out / "metrics.json").read_text())["global_step"] == 8

    # Second sweep: finished cells are skipped untouched; the failed one is tried again.
    stamp = {c.name: (c.out / "metrics.json").stat().st_mtime_ns for c in cells}
    results = run_sweep(cells, progress=False)
    out = capsys.readouterr().out
    assert "adamw-sogclr-s0" in out and "skipped (done" in out and "skipped (diverged" in out
    assert (partial.out / "metrics.json").stat().st_mtime_ns == stamp["adamw-sogclr-s0"]
    assert (runs / "boom-sogclr-s0" / "metrics.json").stat().st_mtime_ns == stamp["boom-sogclr-s0"]
    assert (runs / "broken-sogclr-s0" / "metrics.json").stat().st_mtime_ns != stamp["broken-sogclr-s0"]


def test_bad_papermill_parameter_type_fails_naming_it(tmp_path, demo_data_dir):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(NOTEBOOKS / "train.ipynb"),
            str(tmp_path / "out.ipynb"),
            kernel_name="python3",
            progress_bar=False,
            parameters={"profile": "smoke", "data": str(demo_data_dir), "out": str(tmp_path / "run"), "seed": "zero"},
        )
    assert "seed" in str(err.value) and "ConfigError" in str(err.value)


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_a_dead_kernel_fails_its_cell_while_the_other_job_completes(tmp_path, demo_data_dir, monkeypatch, capsys):
    """``--jobs 2``: two cells run at once, one thread per cell on a CPU; the kernel of one dies (kill -9 of
    itself mid-cell): that cell is recorded as failed naming the dead kernel, the other completes, and its
    numbers equal an uninterrupted in-process run's."""
    import nbformat

    import clipstudy.study.sweep as sweep_mod

    notebook = nbformat.read(NOTEBOOKS / "train.ipynb", as_version=4)
    dying = nbformat.v4.new_code_cell(
        # the sweep hands the notebook its whole configuration (run_config)
        'import os, signal\nif run_config["loss"] == "vicreg":\n    os.kill(os.getpid(), signal.SIGKILL)'
    )
    at = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and "train(" in c.source)
    notebook.cells.insert(at, dying)  # after the parameters, before train()
    nbformat.write(notebook, tmp_path / "train.ipynb")
    monkeypatch.setattr(sweep_mod.paths, "notebook", lambda name: tmp_path / "train.ipynb")
    monkeypatch.setattr(sweep_mod.os, "cpu_count", lambda: 2)
    runs = tmp_path / "runs"
    code = sweep_main(
        [
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(runs),
            "--optimizers",
            "adamw",
            "--losses",
            "vicreg,clip",
            "--jobs",
            "2",
            "--set",
            "epochs=1",
        ]
    )
    out = capsys.readouterr().out
    # the sweep went on, and exits 1 after its summary because a cell failed
    assert code == 1 and "sweep finished in" in out and "1 completed, 1 failed" in out, out
    failed = json.loads((runs / "adamw-vicreg-s0" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "DeadKernelError" in failed["error"], failed
    assert re.search(r"^adamw-vicreg-s0\s+FAILED: DeadKernelError", out, re.M), out
    assert re.search(r"^adamw-clip-s0\s+completed", out, re.M), out
    done = json.loads((runs / "adamw-clip-s0" / "metrics.json").read_text())
    executed = (runs / "adamw-clip-s0" / "train.ipynb").read_text()
    assert '\\"threads\\": 1' in executed or "'threads': 1" in executed  # jobs 2 on 2 cores: a thread each
    reference = train_mod.train(
        make_config("smoke", data=str(demo_data_dir), out=str(tmp_path / "ref"), loss="clip", epochs=1, threads=1),
        progress=False,
    )
    skip = {"wall_time_s", "train_samples_per_s", "peak_memory_mb", "git_commit", "eval_time"}
    assert {k: v for k, v in done.items() if k not in skip} == {k: v for k, v in reference.items() if k not in skip}


SIGNAL_AT_STEP_3 = """import os, signal
import clipstudy.engine.train as _train_module
_step, _count = _train_module.train_step, [0]
def _step_then_sigterm(run, batch):
    out = _step(run, batch)
    _count[0] += 1
    if _count[0] == 3:  # as Slurm's requeue or a preemption would, mid-training
        os.kill(os.getpid(), signal.SIGTERM)
    return out
_train_module.train_step = _step_then_sigterm"""


def test_a_cell_stopped_by_a_signal_is_interrupted_not_failed_and_resumes(tmp_path, demo_data_dir, capsys):
    """SIGTERM reaches the kernel mid-training (scontrol requeue, preemption): training checkpoints, the notebook
    ends in KeyboardInterrupt, and the cell records ``interrupted``, never ``failed``; the next run resumes."""
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / "train.ipynb", as_version=4)
    at = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and "train(" in c.source)
    notebook.cells.insert(at, nbformat.v4.new_code_cell(SIGNAL_AT_STEP_3))
    nbformat.write(notebook, tmp_path / "train.ipynb")
    (cell,) = plan_cells(
        "smoke",
        optimizers=["adamw"],
        losses=["clip"],
        overrides={"data": str(demo_data_dir), "threads": 1, "epochs": 2},
        runs_root=tmp_path / "runs",
    )
    metrics = run_cell(cell, notebook=tmp_path / "train.ipynb")
    recorded = json.loads((cell.out / "metrics.json").read_text())
    assert metrics["status"] == recorded["status"] == "interrupted", recorded
    assert "error" not in recorded and "checkpoint saved" in recorded["note"], recorded
    assert record_state(cell.out, cell.config) == ("interrupted", "resumes from ckpt-00000003.pt")
    assert summary_line(cell, metrics).startswith(f"{cell.name:<28} interrupted, checkpoint kept (")
    assert run_cell(cell)["status"] == "completed"
    assert "ckpt-00000003.pt" in (cell.out / "train.ipynb").read_text()  # resumed, not restarted


def test_an_error_after_the_scheduler_asked_the_cell_to_stop_is_that_stop(tmp_path, monkeypatch):
    """submitit's signal handler runs in the thread waiting for the notebook: what it raises there (scontrol
    requeue killed by the requeue's own SIGTERM, say) surfaces as the notebook's error; once the scheduler asked
    the cell to stop, that is an interruption."""
    import subprocess

    from clipstudy.study import cells

    killed = subprocess.CalledProcessError(-15, ["scontrol", "requeue", "7"])
    assert cells.interruption(killed) == ""  # on its own: a failure
    monkeypatch.setitem(cells._SCHEDULER_STOP, "note", "")
    cells.scheduler_stopping("stopped by the scheduler's signal")
    assert cells.interruption(killed) == "stopped by the scheduler's signal"


def fake_cell_run(cell, **kwargs) -> dict:
    """What run_cell leaves behind for a completed cell (its fingerprint and metrics), without training."""
    write_cell_record(cell.out, "completed", config=cell.config, average=1.0)
    return json.loads((cell.out / "metrics.json").read_text())


def test_status_and_rerun_of_a_runs_folder_need_no_repeated_option(tmp_path, demo_data_dir, monkeypatch, capsys):
    """The sweep remembers its options in RUNS/sweep.json: --status, --dry-run and a rerun with only --runs describe
    the cells as they were run (done, not stale), say which settings they took; options given still win."""
    import clipstudy.study.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_cell", fake_cell_run)
    runs = tmp_path / "runs"
    first = ["--profile", "smoke", "--data", str(demo_data_dir), "--runs", str(runs), "--optimizers", "adamw"]
    assert sweep_main([*first, "--losses", "clip", "--set", "epochs=1", "--set", "threads=1"]) == 0
    capsys.readouterr()
    assert sweep_main(["--runs", str(runs), "--status"]) == 0
    out = capsys.readouterr().out
    said = out.splitlines()[0]
    assert said.startswith(f"settings from {runs / 'sweep.json'} (the last sweep there): --profile smoke"), said
    assert "--set epochs=1 --set threads=1" in said and f"--data {demo_data_dir}" in said
    assert re.search(r"^adamw-clip-s0\s+done\s", out, re.M) and "stale" not in out, out
    assert sweep_main(["--runs", str(runs), "--dry-run"]) == 0
    assert re.search(r"^adamw-clip-s0\s+done \(", capsys.readouterr().out, re.M)
    # an option given is compared: other settings make the cell stale
    assert sweep_main(["--runs", str(runs), "--status", "--set", "epochs=2"]) == 0
    assert re.search(r"^adamw-clip-s0\s+stale\s.*epochs 1 -> 2", capsys.readouterr().out, re.M)
    # a rerun with only --runs is the same sweep: nothing to do
    assert sweep_main(["--runs", str(runs)]) == 0
    assert "adamw-clip-s0                skipped (done" in capsys.readouterr().out
    # a second sweep into the folder (another loss): the status shows both sweeps' cells
    assert sweep_main([*first, "--losses", "sogclr", "--set", "epochs=1", "--set", "threads=1"]) == 0
    capsys.readouterr()
    assert sweep_main(["--runs", str(runs), "--status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^adamw-clip-s0\s+done\s", out, re.M) and re.search(r"^adamw-sogclr-s0\s+done\s", out, re.M)
    manifest = json.loads((runs / "sweep.json").read_text())
    assert [s["settings"]["losses"] for s in manifest["sweeps"]] == ["clip", "sogclr"]


def test_cells_without_notebooks_train_the_same_run_as_the_notebook(demo_data_dir, tmp_path):
    """Tuning trials run in worker processes instead of the notebook: the same configuration, the same numbers,
    the same records; only the executed notebook is missing. A failing cell is recorded as failed."""
    from test_executors import comparable, history_losses

    settings = {"data": str(demo_data_dir), "epochs": 2, "threads": 1}
    by_notebook = plan_cells(
        "smoke", optimizers=["adamw"], losses=["clip"], overrides=settings, runs_root=tmp_path / "a"
    )
    by_worker = plan_cells("smoke", optimizers=["adamw"], losses=["clip"], overrides=settings, runs_root=tmp_path / "b")
    run_sweep(by_notebook, progress=False)
    results = run_sweep(by_worker, progress=False, notebooks=False)
    a, b = by_notebook[0].out, by_worker[0].out
    assert results[by_worker[0].name]["status"] == "completed"
    assert (a / "train.ipynb").is_file() and not (b / "train.ipynb").exists()
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    assert comparable(ma) == comparable(mb) and mb["average"] == ma["average"]
    assert history_losses(a) == history_losses(b)
    assert cell_state(b, by_worker[0].config)[0] == "done"  # and a rerun trains nothing
    # a cell whose training raises is recorded as failed, with the error
    broken = plan_cells(
        "smoke",
        optimizers=["adamw"],
        losses=["clip"],
        runs_root=tmp_path / "c",
        overrides={**settings, "data": str(tmp_path / "none")},
    )
    failed = run_sweep(broken, progress=False, notebooks=False)[broken[0].name]
    assert failed["status"] == "failed" and failed.get("error"), failed
