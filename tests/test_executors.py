"""The sweep's executors: submitit's local executor (real subprocesses), Slurm with fake commands on PATH,
multi-process (DDP) cells, preemption and resubmission; TensorBoard event files of a cell."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.engine.config import make_config
from clipstudy.engine.tensorboard_log import read_scalars
from clipstudy.engine.train import train
from clipstudy.study import executors
from clipstudy.study.resources import DEFAULT_MAX_REQUEUES
from clipstudy.study.sweep import plan_cells


def sweep_main(argv: list[str]) -> int:
    """The sweep through the dispatcher, which turns its errors into one line and an exit status."""
    return clipstudy_main(["sweep", *argv])


REPO_ROOT = Path(__file__).resolve().parents[1]
# a short cell: 3 epochs of 4 steps on the tiny demo data, one torch thread
SHORT = {"threads": 1, "epochs": 3}


def sweep_args(data, runs, losses="clip", *extra):
    return [
        "--profile",
        "smoke",
        "--data",
        str(data),
        "--runs",
        str(runs),
        "--optimizers",
        "adamw",
        "--losses",
        losses,
        "--set",
        "threads=1",
        "--set",
        "epochs=3",
        *extra,
    ]


def comparable(metrics: dict) -> dict:
    """The numbers a resumed or relocated run must reproduce (not timings or places)."""
    keys = ("status", "txt_r1", "img_r1", "zeroshot_top1", "average", "global_step", "epochs_completed")
    return {k: metrics.get(k) for k in keys}


def history_losses(run: Path) -> list[float]:
    with open(run / "history.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def reference(data, out: Path, loss: str = "clip", **fields) -> dict:
    """The same cell trained in this process without any executor, never interrupted."""
    config = make_config(
        "smoke", optimizer="adamw", loss=loss, seed=0, data=str(data), out=str(out), **{**SHORT, **fields}
    )
    return train(config, progress=False)


# ===================================================================== TensorBoard
def test_tensorboard_events_hold_every_logged_scalar(demo_data_dir, tmp_path):
    run = tmp_path / "run"
    reference(demo_data_dir, run, loss="isogclr", epochs=2)
    scalars = read_scalars(run)
    with open(run / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    with open(run / "epochs.csv") as fh:
        epochs = list(csv.DictReader(fh))
    # every numeric history column, diagnostics included (iSogCLR's temperatures), one event per row
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(scalars)
    assert any(tag.startswith("train/") and "tau" in tag for tag in scalars), sorted(scalars)
    for column in history[0]:
        if column in ("step", "epoch"):
            continue
        events = scalars[f"train/{column}"]
        assert [s for s, _ in events] == [int(row["step"]) for row in history], column
        np.testing.assert_allclose(
            [v for _, v in events], [float(row[column]) for row in history], rtol=1e-6, err_msg=column
        )  # TensorBoard stores float32
    for column in ("val_txt_r1", "val_img_r1", "val_zeroshot_top1", "val_average"):
        events = scalars[f"eval/{column}"]
        assert [s for s, _ in events] == [int(row["step"]) for row in epochs]
        np.testing.assert_allclose([v for _, v in events], [float(row[column]) for row in epochs], rtol=1e-6)


def test_tensorboard_off_writes_no_event_file(demo_data_dir, tmp_path):
    run = tmp_path / "run"
    reference(demo_data_dir, run, epochs=1, tensorboard=False)
    assert (run / "history.csv").is_file() and not list(run.glob("events.out.tfevents.*"))


# ===================================================================== Slurm, faked
# sbatch numbers arrays 4242, 4243, ... and records each script (or refuses with the text of $FAKE_SLURM/reject);
# squeue lists the jobs of $FAKE_SLURM/jobs ("ID|STATE|REASON" lines) that Slurm still holds, as `squeue -h -r -o
# %i|%T|%r` does; sacct answers from the same file, or as a cluster without accounting does ($FAKE_SLURM/no-acct).
FAKE_SBATCH = """#!/bin/bash
if [ -f "$FAKE_SLURM/reject" ]; then cat "$FAKE_SLURM/reject" >&2; exit 1; fi
n=$(ls "$FAKE_SLURM" | grep -c submitted)
cp "$1" "$FAKE_SLURM/submitted-$n.sh"
echo "Submitted batch job $((4242 + n))"
"""
FAKE_SQUEUE = """#!/bin/bash
grep -E '[|](PENDING|RUNNING|COMPLETING|REQUEUED|SUSPENDED)[|]' "$FAKE_SLURM/jobs" 2>/dev/null
exit 0
"""
FAKE_SACCT = """#!/bin/bash
if [ -f "$FAKE_SLURM/no-acct" ]; then echo "Slurm accounting storage is disabled" >&2; exit 1; fi
cut -d'|' -f1,2 "$FAKE_SLURM/jobs" 2>/dev/null
exit 0
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch / sacct / squeue / srun / scontrol on PATH that record what they are given (as submitit's own tests
    do with a mock); returns the folder holding the submitted scripts and the job states the fakes report."""
    import submitit

    record, bin_dir = tmp_path / "slurm", tmp_path / "bin"
    record.mkdir()
    bin_dir.mkdir()
    for name, text in {
        "sbatch": FAKE_SBATCH,
        "sacct": FAKE_SACCT,
        "squeue": FAKE_SQUEUE,
        "srun": "#!/bin/bash\nexit 0\n",
        "scontrol": "#!/bin/bash\nexit 0\n",
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(record))
    submitit.SlurmJob.watcher.clear()
    yield record
    submitit.SlurmJob.watcher.clear()


def set_jobs(fake: Path, **jobs: str) -> None:
    """The scheduler's view: ``set_jobs(fake, **{"4242_0": "PENDING|BeginTime"})``; a job left out is gone."""
    (fake / "jobs").write_text(
        "".join(f"{job_id}|{state}{'' if '|' in state else '|None'}\n" for job_id, state in jobs.items())
    )


def submitted(fake: Path) -> list[str]:
    return [p.read_text() for p in sorted(fake.glob("submitted-*.sh"))]


def test_slurm_sweep_submits_one_array_and_status_shows_jobs(demo_data_dir, tmp_path, fake_slurm, capsys):
    import submitit

    runs = tmp_path / "runs"
    args = sweep_args(
        demo_data_dir,
        runs,
        "clip,sogclr",
        "--executor",
        "slurm",
        "--partition",
        "gpu",
        "--account",
        "study",
        "--time",
        "90",
        "--gpus-per-cell",
        "2",
        "--cpus-per-cell",
        "8",
        "--mem-gb",
        "64",
        "--sbatch",
        "qos=high",
        "--sbatch",
        "constraint=a100",
    )
    assert sweep_main(args) == 0
    out = capsys.readouterr().out
    assert len(submitted(fake_slurm)) == 1, "the cells must go out as one job array"
    script = submitted(fake_slurm)[0]
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --time=90",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=study",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --signal=USR2@90",
    ):
        assert line in script.splitlines(), f"{line} missing from\n{script}"
    assert "submitit.core._submit" in script  # the task is submitit's runner of the pickled CellTask
    for k, loss in enumerate(("clip", "sogclr")):
        cell = runs / f"adamw-{loss}-s0"
        job = json.loads((cell / "job.json").read_text())
        assert job["executor"] == "slurm" and job["job_id"] == f"4242_{k}"
        assert os.readlink(cell / "job.out") == job["stdout"] and "4242_" in job["stdout"]
        assert re.search(rf"adamw-{loss}-s0\s+submitted as Slurm job 4242_{k}", out), out
        # the pickled task is the same papermill cell the local sweep runs, in the same run directory
        submission = submitit.SlurmJob(folder=job["folder"], job_id=f"4242_{k}").submission()
        task = submission.function
        assert isinstance(task, executors.CellTask) and task.cell.out == cell and task.cell.loss == loss
        assert hasattr(task, "checkpoint")
        # up to 20 time limits (--max-requeues' default), not submitit's 3
        assert submission._timeout_countdown == DEFAULT_MAX_REQUEUES == 20
        assert task.threads is None  # decided on the node, from the allocation

    set_jobs(fake_slurm, **{"4242_0": "RUNNING", "4242_1": "PENDING|Priority"})
    # the runs folder remembers the sweep: --status needs no other option, and calls nothing stale
    assert sweep_main(["--runs", str(runs), "--status"]) == 0
    status = capsys.readouterr().out
    assert re.search(r"adamw-clip-s0\s+running\s+4242_0\s+RUNNING\s+\S+adamw-clip-s0/job.out", status), status
    assert re.search(r"adamw-sogclr-s0\s+queued\s+4242_1\s+PENDING \(Priority\)\s", status), status
    assert "stale" not in status
    # rerunning the folder while the jobs are queued or running submits nothing
    assert sweep_main(["--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "adamw-clip-s0                not submitted: its Slurm job 4242_0 is still RUNNING" in out, out
    assert len(submitted(fake_slurm)) == 1
    # once Slurm has given up on them (cancelled), the same rerun sends the unfinished cells again, as they were
    set_jobs(fake_slurm, **{"4242_0": "CANCELLED", "4242_1": "CANCELLED"})
    assert sweep_main(["--runs", str(runs)]) == 0
    assert len(submitted(fake_slurm)) == 2
    again = submitted(fake_slurm)[1].replace("4243", "4242")
    assert [x for x in again.splitlines() if x.startswith("#SBATCH")] == [
        x for x in script.splitlines() if x.startswith("#SBATCH")
    ]
    assert json.loads((runs / "adamw-clip-s0" / "job.json").read_text())["job_id"] == "4243_0"


def test_slurm_options_are_checked_before_submitting(demo_data_dir, tmp_path, fake_slurm, capsys):
    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "local", "--nodes", "2")) == 2
    assert "--executor slurm" in capsys.readouterr().err
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm", "--sbatch", "qos")) == 2
    assert "--sbatch" in capsys.readouterr().err
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm", "--max-requeues", "-1")) == 2
    assert "--max-requeues -1: must be >= 0" in capsys.readouterr().err
    assert not submitted(fake_slurm)


def test_max_requeues_and_no_thread_count_reach_submitit(demo_data_dir, tmp_path, fake_slurm):
    import submitit

    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm", "--max-requeues", "5")) == 0
    job = json.loads((runs / "adamw-clip-s0" / "job.json").read_text())
    submission = submitit.SlurmJob(folder=job["folder"], job_id=job["job_id"]).submission()
    assert submission._timeout_countdown == 5
    # a CPU cell: its torch threads are decided on the node from the allocation, not here from os.cpu_count()
    assert submission.function.threads is None


def test_a_refused_submission_is_one_line(demo_data_dir, tmp_path, fake_slurm, capsys):
    (fake_slurm / "reject").write_text(
        "sbatch: error: invalid partition specified: nosuch\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    )
    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm", "--partition", "nosuch")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sbatch refused the job array: "), err
    assert "invalid partition specified: nosuch" in err and "--partition" in err
    assert not (runs / "adamw-clip-s0" / "job.json").exists()


def write_record(cell, status: str, **fields) -> None:
    """A metrics.json as the cell would write it (fields of the cell, then ``fields``)."""
    from clipstudy.study.cells import cell_record

    metrics = cell_record(cell, status, **({"note": "stopped by a signal"} if status == "interrupted" else {}))
    (cell.out / "metrics.json").write_text(json.dumps({**metrics, **fields}))


def test_without_accounting_a_requeued_cell_is_requeued_never_failed(demo_data_dir, tmp_path, fake_slurm, capsys):
    """sacct answers "accounting storage is disabled": squeue tells the state; a cell whose job was requeued after
    its run recorded an interruption (or an earlier failure) shows requeued and is not submitted again."""
    (fake_slurm / "no-acct").write_text("")
    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm")) == 0
    (cell,) = plan_cells(
        "smoke", optimizers=["adamw"], losses=["clip"], overrides={"data": str(demo_data_dir)}, runs_root=runs
    )
    capsys.readouterr()
    for status in ("interrupted", "failed"):
        write_record(cell, status)
        set_jobs(fake_slurm, **{"4242": "PENDING|BeginTime"})
        assert sweep_main(["--runs", str(runs), "--status"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"adamw-clip-s0\s+requeued\s+4242\s+PENDING \(BeginTime\)", out), out
        assert "failed" not in out
        assert sweep_main(["--runs", str(runs)]) == 0
        assert "still PENDING (BeginTime)" in capsys.readouterr().out and len(submitted(fake_slurm)) == 1
    # the job left the queue (no accounting: nothing more is known of it): the run directory tells the state
    write_record(cell, "interrupted")
    set_jobs(fake_slurm)
    assert sweep_main(["--runs", str(runs), "--status"]) == 0
    assert re.search(r"adamw-clip-s0\s+interrupted\s+4242\s+gone\s", capsys.readouterr().out)
    assert sweep_main(["--runs", str(runs)]) == 0
    assert "submitted as Slurm job 4243" in capsys.readouterr().out


def test_status_gives_the_pending_reason_and_what_it_means(demo_data_dir, tmp_path, fake_slurm, capsys):
    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm", "--partition", "short")) == 0
    set_jobs(fake_slurm, **{"4242": "PENDING|PartitionTimeLimit"})
    capsys.readouterr()
    assert sweep_main(["--runs", str(runs), "--status"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("adamw-clip-s0")][0]
    assert re.search(r"queued\s+4242\s+PENDING \(PartitionTimeLimit\)", line), line
    assert "--time is above the partition's time limit" in line and "lower --time" in line


def test_wait_outlasts_a_requeue_and_reports_the_end(demo_data_dir, tmp_path, fake_slurm, capsys):
    """The job's first run leaves its result (interrupted) and Slurm requeues it: --wait says requeued and goes on
    waiting, then reports the end of the requeued run, never FAILED (submitit's own wait returns at the first
    result file)."""
    import threading

    from submitit.core.utils import JobPaths, cloudpickle_dump

    from clipstudy.study import jobs

    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip", "--executor", "slurm")) == 0
    (cell,) = plan_cells(
        "smoke", optimizers=["adamw"], losses=["clip"], overrides={"data": str(demo_data_dir)}, runs_root=runs
    )
    record = json.loads((cell.out / "job.json").read_text())
    assert record["job_id"] == "4242"  # one cell: a plain job, not an array
    result = JobPaths(record["folder"], job_id="4242", task_id=0).result_pickle
    set_jobs(fake_slurm, **{"4242": "RUNNING"})

    def scheduler():
        time.sleep(0.3)  # the first run is interrupted: a result file, then Slurm holds the job again
        write_record(cell, "interrupted")
        cloudpickle_dump(("success", json.loads((cell.out / "metrics.json").read_text())), result)
        set_jobs(fake_slurm, **{"4242": "PENDING|BeginTime"})
        time.sleep(0.5)
        set_jobs(fake_slurm, **{"4242": "RUNNING"})
        time.sleep(0.3)
        write_record(cell, "completed", average=42.0)
        cloudpickle_dump(("success", json.loads((cell.out / "metrics.json").read_text())), result)
        set_jobs(fake_slurm, **{"4242": "COMPLETED"})

    thread = threading.Thread(target=scheduler)
    capsys.readouterr()
    thread.start()
    results = jobs.wait_for_jobs([cell], poll_s=0.05)
    thread.join()
    out = capsys.readouterr().out
    assert results[cell.name]["status"] == "completed" and results[cell.name]["average"] == 42.0
    assert re.search(r"adamw-clip-s0\s+requeued \(job 4242 PENDING \(BeginTime\)\); waiting", out), out
    assert re.search(r"adamw-clip-s0\s+completed", out) and "FAILED" not in out, out


def test_threads_come_from_the_allocation(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert executors.allocation_threads({}) is None  # not in a Slurm job: the submitter decides
    job = {"SLURM_JOB_ID": "7"}
    assert executors.allocation_threads({**job, "SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "64"}) == 3
    # without --cpus-per-task: the node's CPUs of the job, shared by its tasks there
    assert executors.allocation_threads({**job, "SLURM_CPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "2"}) == 2
    assert executors.allocation_threads({**job, "SLURM_CPUS_ON_NODE": "1"}) == 1
    # never more than the CPUs this task may run on
    assert executors.allocation_threads({**job, "SLURM_CPUS_PER_TASK": "16"}) == 4


def finished_cell(demo_data_dir, runs):
    from clipstudy.engine.fingerprint import fingerprint

    (cell,) = plan_cells(
        "smoke", optimizers=["adamw"], losses=["clip"], overrides={"data": str(demo_data_dir)}, runs_root=runs
    )
    cell.out.mkdir(parents=True)
    (cell.out / "config.json").write_text(json.dumps({"fingerprint": fingerprint(cell.config)}))
    write_record(cell, "completed", average=1.0)
    return cell


def test_a_signal_after_training_ended_requeues_nothing(demo_data_dir, tmp_path, monkeypatch, capsys):
    cell = finished_cell(demo_data_dir, tmp_path / "runs")
    monkeypatch.setattr(executors, "stop_kernels", lambda *a, **k: pytest.fail("a finished cell's kernel signalled"))
    assert executors.CellTask(cell).checkpoint() is None  # submitit: "not requeued"
    assert "came after training ended (done); not requeued" in capsys.readouterr().out


def test_the_not_requeued_error_of_a_finished_cell_returns_its_result(demo_data_dir, tmp_path, monkeypatch):
    """submitit raises UncompletedJobError in the task when checkpoint() declines; a finished cell returns its
    metrics (the job succeeds), an unfinished one lets the error through."""
    from submitit.core.utils import UncompletedJobError

    cell = finished_cell(demo_data_dir, tmp_path / "runs")

    def declined(*args, **kwargs):
        raise UncompletedJobError("Job not requeued because: checkpoint function returned None.")

    monkeypatch.setattr(executors, "run_cell", declined)
    assert executors.CellTask(cell)()["average"] == 1.0
    write_record(cell, "interrupted")
    with pytest.raises(UncompletedJobError):
        executors.CellTask(cell)()


# ===================================================================== the local executor
@pytest.mark.slow
@pytest.mark.faults  # excluded from the default run like the other slow end-to-end tests: `make test-faults`
@pytest.mark.timeout(900)
def test_local_executor_two_cells_then_the_report(demo_data_dir, tmp_path, capsys):
    from clipstudy.study import report, results

    runs = tmp_path / "runs"
    assert sweep_main(sweep_args(demo_data_dir, runs, "clip,sogclr", "--executor", "local", "--jobs", "2")) == 0
    out = capsys.readouterr().out
    for loss in ("clip", "sogclr"):
        cell = runs / f"adamw-{loss}-s0"
        assert re.search(rf"adamw-{loss}-s0\s+completed", out), out
        job = json.loads((cell / "job.json").read_text())
        assert job["executor"] == "local" and (cell / "job.out").resolve() == Path(job["stdout"]).resolve()
        assert int(job["job_id"]) != os.getpid()  # ran in a subprocess
        assert (cell / "train.ipynb").is_file() and list(cell.glob("events.out.tfevents.*"))
        # the same numbers as the cell trained here, without an executor
        assert comparable(json.loads((cell / "metrics.json").read_text())) == comparable(
            reference(demo_data_dir, tmp_path / "reference" / loss, loss=loss)
        )
    html = report.render("smoke", runs, tmp_path / "report")
    assert "Adamw" in html.read_text() or "AdamW" in html.read_text()
    assert len(results.collect_runs(runs)) == 2


def resumed_step(run: Path) -> int:
    """The step the executed notebook says training resumed from (the line train() prints on resume)."""
    found = re.findall(r"resumed from \S+ \(epoch \d+, batch \d+, step (\d+)\)", (run / "train.ipynb").read_text())
    assert found, f"{run.name} did not resume: no 'resumed from' line in its notebook"
    return int(found[-1])


@pytest.mark.slow
@pytest.mark.faults  # excluded from the default run like the other slow end-to-end tests: `make test-faults`
@pytest.mark.timeout(900)
def test_local_cell_killed_mid_run_resumes_on_resubmission(demo_data_dir, tmp_path):
    from test_faults import completed, has_full_checkpoint, kill_everything, start_sweep, wait_for

    from clipstudy.engine.checkpoint import load_latest

    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "clipstudy", "sweep", *sweep_args(demo_data_dir, runs, "clip", "--executor", "local")]
    cell = runs / "adamw-clip-s0"
    log = tmp_path / "sweep.log"
    proc = start_sweep(cmd, log)
    wait_for(lambda: has_full_checkpoint(cell), proc, log)
    kill_everything(proc)  # the sweep, submitit's controller, the task and the kernel, all with kill -9
    assert not completed(cell), "the cell finished before the kill; nothing was interrupted"
    _, newest, _ = load_latest(cell / "checkpoints")
    saved_step = int(re.search(r"(\d+)", newest.name).group(1))
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert again.returncode == 0 and re.search(r"adamw-clip-s0\s+completed", again.stdout), again.stdout + again.stderr
    assert 0 < resumed_step(cell) == saved_step
    assert comparable(json.loads((cell / "metrics.json").read_text())) == comparable(
        reference(demo_data_dir, tmp_path / "reference")
    )
    assert history_losses(cell) == history_losses(tmp_path / "reference")


@pytest.mark.slow
@pytest.mark.faults  # excluded from the default run like the other slow end-to-end tests: `make test-faults`
@pytest.mark.timeout(900)
def test_preempted_local_job_checkpoints_is_requeued_and_resumes(demo_data_dir, tmp_path):
    """USR2, the signal Slurm sends before a time limit or on preemption (submitit's local executor sends it too),
    reaches the task: submitit calls CellTask.checkpoint, training checkpoints, the job is requeued and resumes."""
    import signal

    from test_faults import has_full_checkpoint

    runs = tmp_path / "runs"
    (cell,) = plan_cells(
        "smoke",
        optimizers=["adamw"],
        losses=["clip"],
        overrides={"data": str(demo_data_dir), **SHORT, "epochs": 5},
        runs_root=runs,
    )
    (job,) = executors.submit_cells("local", [cell], executors.Resources(time_min=30), runs / ".submitit")
    deadline = time.time() + 600
    while not has_full_checkpoint(cell.out) and not job.done() and time.time() < deadline:
        time.sleep(0.05)
    assert not job.done(), "the job ended before it could be preempted"
    tasks = executors.child_pids(int(job.job_id))  # submitit's controller -> the task running CellTask
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    metrics = job.results()[0]
    assert metrics["status"] == "completed", metrics
    logs = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "Requeued job" in logs  # submitit requeued it ...
    assert "adamw-clip-s0: training checkpointed and stopped" in logs  # ... after CellTask.checkpoint
    assert resumed_step(cell.out) > 0
    assert comparable(metrics) == comparable(reference(demo_data_dir, tmp_path / "reference", epochs=5))
    assert history_losses(cell.out) == history_losses(tmp_path / "reference")


@pytest.mark.slow
@pytest.mark.faults  # excluded from the default run like the other slow end-to-end tests: `make test-faults`
@pytest.mark.timeout(900)
@pytest.mark.parametrize("executor", ["local", "inline"])
def test_two_process_ddp_cell(demo_data_dir, tmp_path, capsys, executor):
    """--procs-per-node 2 on a CPU: two gloo ranks (local: submitit tasks + TorchDistributedEnvironment;
    inline: torchrun); rank 0 runs the notebook; the cell equals one process on the global batch."""
    runs = tmp_path / "runs"
    args = sweep_args(
        demo_data_dir,
        runs,
        "sogclr",
        "--executor",
        executor,
        "--procs-per-node",
        "2",
        "--set",
        "small_resnet_norm=group",
        "--set",
        "epochs=1",
    )
    assert sweep_main(args) == 0
    assert re.search(r"adamw-sogclr-s0\s+completed", capsys.readouterr().out)
    cell = runs / "adamw-sogclr-s0"
    assert json.loads((cell / "config.json").read_text())["world_size"] == 2
    assert (cell / "train.ipynb").is_file() and list(cell.glob("events.out.tfevents.*"))
    one = reference(demo_data_dir, tmp_path / "one", loss="sogclr", epochs=1, small_resnet_norm="group")
    two = json.loads((cell / "metrics.json").read_text())
    assert history_losses(cell) == pytest.approx(history_losses(tmp_path / "one"), rel=1e-4, abs=1e-5)
    for key in ("txt_r1", "img_r1", "zeroshot_top1"):
        assert two[key] == pytest.approx(one[key], abs=1e-6)


# ===================================================================== the task, in process (fast; mutation tests)
class FakeJobEnvironment:
    """submitit.JobEnvironment as a job of ``cluster`` with ``num_tasks`` tasks sees it."""

    cluster = "local"
    num_tasks = 1

    def __init__(self):
        pass


class NotInAJob:
    """submitit.JobEnvironment outside any submitit job: it raises, as submitit's own does."""

    def __init__(self):
        raise RuntimeError("Could not figure out which environment the job is runnning in.")


def fake_job(monkeypatch, cluster: str = "local", num_tasks: int = 1) -> None:
    import submitit

    job = type("Job", (FakeJobEnvironment,), {"cluster": cluster, "num_tasks": num_tasks})
    monkeypatch.setattr(submitit, "JobEnvironment", job)


def test_distributed_rank_outside_a_job_reads_rank_or_zero(monkeypatch):
    import submitit

    monkeypatch.setattr(submitit, "JobEnvironment", NotInAJob)
    monkeypatch.delenv("RANK", raising=False)
    assert executors.distributed_rank() == 0  # a plain process
    monkeypatch.setenv("RANK", "3")  # torchrun's rank 3
    assert executors.distributed_rank() == 3


def test_distributed_rank_exports_torch_distributed_only_for_several_tasks(monkeypatch):
    """One task: nothing exported, rank 0 (or what RANK says); several: submitit's TorchDistributedEnvironment
    exports RANK (every GPU kept visible, an inherited RANK overwritten) and that rank is returned."""
    from submitit import helpers

    exported = []

    class Torch:
        def export(self, **kwargs):
            exported.append(kwargs)
            monkeypatch.setenv("RANK", "5")  # what submitit writes for task 5

    monkeypatch.setattr(helpers, "TorchDistributedEnvironment", Torch)
    monkeypatch.delenv("RANK", raising=False)
    fake_job(monkeypatch, num_tasks=1)
    assert executors.distributed_rank() == 0 and exported == []
    monkeypatch.setenv("RANK", "2")
    assert executors.distributed_rank() == 2 and exported == []
    monkeypatch.delenv("RANK")
    fake_job(monkeypatch, num_tasks=2)
    assert executors.distributed_rank() == 5
    assert exported == [{"set_cuda_visible_devices": False, "overwrite": True}]
    monkeypatch.delenv("RANK")


class FakeCell:
    """What CellTask uses of a cell: its name, run directory and config."""

    def __init__(self, out: Path, name: str = "adamw-clip-s0"):
        self.out, self.name, self.config = out, name, object()


def test_cell_task_runs_the_notebook_on_rank_0_and_trains_directly_elsewhere(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(executors, "run_cell", lambda cell, **kw: calls.append(("notebook", cell, kw)) or {"r": 0})
    monkeypatch.setattr(executors, "train_rank", lambda *args: calls.append(("train", *args)) or {"r": 1})
    monkeypatch.setattr(executors, "allocation_threads", lambda: 7)  # what Slurm gave the task
    cell = FakeCell(tmp_path)
    monkeypatch.setattr(executors, "distributed_rank", lambda: 0)
    assert executors.CellTask(cell, "cuda", 3)() == {"r": 0}  # the submitter's thread count wins
    assert executors.CellTask(cell, "cpu")() == {"r": 0}  # none given: the allocation's
    assert calls == [
        ("notebook", cell, {"device": "cuda", "threads": 3}),
        ("notebook", cell, {"device": "cpu", "threads": 7}),
    ]
    calls.clear()
    monkeypatch.setattr(executors, "distributed_rank", lambda: 1)
    assert executors.CellTask(cell, "cuda", 3)() == {"r": 1}
    assert executors.CellTask(cell, "cpu")() == {"r": 1}
    assert calls == [("train", cell, "cuda", 3), ("train", cell, "cpu", 7)]


def test_not_requeued_error_on_another_rank_is_raised_even_when_the_cell_finished(tmp_path, monkeypatch):
    """Only rank 0 answers for the cell: a finished cell's metrics stand in for submitit's "not requeued" there,
    any other rank lets the error through."""
    from submitit.core.utils import UncompletedJobError

    cell = FakeCell(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "diverged", "diverged_at_step": 4}))

    def declined(*args, **kwargs):
        raise UncompletedJobError("Job not requeued because: checkpoint function returned None.")

    monkeypatch.setattr(executors, "run_cell", declined)
    monkeypatch.setattr(executors, "train_rank", declined)
    monkeypatch.setattr(executors, "distributed_rank", lambda: 0)
    assert executors.CellTask(cell, threads=1)() == {"status": "diverged", "diverged_at_step": 4}
    monkeypatch.setattr(executors, "distributed_rank", lambda: 1)
    with pytest.raises(UncompletedJobError):
        executors.CellTask(cell, threads=1)()


@pytest.mark.parametrize("cluster, grace", [("slurm", 30.0), ("local", 0.0)])
def test_checkpoint_stops_training_and_requeues_the_same_task(tmp_path, monkeypatch, cluster, grace):
    """submitit's checkpoint hook on an unfinished cell: it says the scheduler is stopping the cell, stops the
    kernel (Slurm: 30 s for the kernel's own USR2 first; local: SIGTERM at once; then up to 40 s) and returns a
    DelayedSubmission of a task for the same cell, device and threads, called with no arguments."""
    from submitit.helpers import DelayedSubmission

    cell = FakeCell(tmp_path)
    asked, notes, stops = [], [], []

    def record_state(out, config):
        asked.append((out, config))
        return "interrupted", "resumes from ckpt-00000008.pt"

    monkeypatch.setattr(executors, "record_state", record_state)
    monkeypatch.setattr(executors, "scheduler_stopping", notes.append)
    monkeypatch.setattr(executors, "stop_kernels", lambda *args, **kwargs: stops.append((args, kwargs)))
    fake_job(monkeypatch, cluster=cluster)
    task = executors.CellTask(cell, "cuda", 6)
    again = task.checkpoint()
    assert asked == [(cell.out, cell.config)]
    assert notes == ["stopped by the scheduler's signal (preemption or time limit) to be requeued"]
    assert stops == [((cell.out,), {"grace_s": grace, "timeout_s": 40.0})]
    assert isinstance(again, DelayedSubmission)
    assert isinstance(again.function, executors.CellTask) and again.function is not task
    assert (again.function.cell, again.function.device, again.function.threads) == (cell, "cuda", 6)
    assert again.args == () and again.kwargs == {}


@pytest.mark.parametrize("state", ["done", "diverged"])
def test_checkpoint_after_training_ended_requeues_nothing_and_signals_nothing(tmp_path, monkeypatch, capsys, state):
    cell = FakeCell(tmp_path, name="sgd-siglip-s1")
    monkeypatch.setattr(executors, "record_state", lambda out, config: (state, "no matter"))
    monkeypatch.setattr(executors, "scheduler_stopping", lambda note: pytest.fail("not a stop"))
    monkeypatch.setattr(executors, "stop_kernels", lambda *a, **k: pytest.fail("a finished cell's kernel signalled"))
    fake_job(monkeypatch, cluster="slurm")
    assert executors.CellTask(cell, "cpu", 1).checkpoint() is None
    assert capsys.readouterr().out == (
        f"sgd-siglip-s1: the scheduler's signal came after training ended ({state}); not requeued\n"
    )


def test_allocation_threads_from_constructed_slurm_environments(monkeypatch):
    """Worked by hand: CPUs per task if Slurm says so; else the node's CPUs (SLURM_CPUS_ON_NODE, else the
    machine's) over the tasks on the node (SLURM_NTASKS_PER_NODE, else SLURM_NTASKS, else 1), floored;
    never more than the affinity mask (here 16 CPUs), never below 1."""

    def affinity(pid):
        assert pid == 0, "the affinity of this process (pid 0) is asked"
        return set(range(16))

    monkeypatch.setattr(os, "sched_getaffinity", affinity)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    job = {"SLURM_JOB_ID": "7"}
    at = executors.allocation_threads
    assert at({"SLURM_CPUS_PER_TASK": "3"}) is None  # no job id: not a Slurm job
    assert at({**job, "SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}) == 3
    assert at({**job, "SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "8"}) == 1
    assert at({**job, "SLURM_CPUS_PER_TASK": "", "SLURM_CPUS_ON_NODE": "8"}) == 8  # empty: not given
    assert at({**job, "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "4"}) == 4
    assert at({**job, "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS": "4"}) == 2
    assert at({**job, "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "3"}) == 2  # 8 // 3
    assert at({**job, "SLURM_CPUS_ON_NODE": "8"}) == 8  # one task
    assert at({**job, "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "0"}) == 8  # no task count: 1
    assert at({**job, "SLURM_CPUS_ON_NODE": "1", "SLURM_NTASKS_PER_NODE": "4"}) == 1  # 1 // 4 = 0 -> 1
    assert at({**job}) == 6  # the machine's CPUs
    assert at({**job, "SLURM_NTASKS_PER_NODE": "2"}) == 3
    assert at({**job, "SLURM_CPUS_ON_NODE": "40"}) == 16  # capped by the affinity mask
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert at({**job}) == 1  # nothing known: one thread


def test_allocation_threads_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    assert executors.allocation_threads() is None
    assert executors.allocation_threads({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "2"}) == 2  # given: only it
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    assert executors.allocation_threads() == 5
    assert executors.allocation_threads({}) is None  # an explicit environment, not the process's


def test_cell_threads_share_this_machine_among_the_cells(monkeypatch):
    from clipstudy.study.resources import Resources

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    ct = executors.cell_threads
    assert ct(Resources(cpus_per_task=5), jobs=4) == 5  # asked for: taken as is
    assert ct(Resources(), jobs=1) == 8
    assert ct(Resources(), jobs=2) == 4
    assert ct(Resources(), jobs=3) == 2  # 8 // 3
    assert ct(Resources(procs_per_node=2), jobs=2) == 2  # 2 cells x 2 ranks
    assert ct(Resources(procs_per_node=2), jobs=1) == 4
    assert ct(Resources(), jobs=0) == 8  # no job count: as one
    assert ct(Resources(), jobs=16) == 1  # 8 // 16 = 0 -> 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert ct(Resources(), jobs=1) == 1


def test_saved_since_names_the_newest_checkpoint_only_if_written_since(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert executors.saved_since(out, 0.0) == ""  # no checkpoints folder
    folder = out / "checkpoints"
    folder.mkdir(parents=True)
    assert executors.saved_since(out, 0.0) == ""  # none in it
    for step, when in ((4, 1_000_000.0), (12, 2_000_000.0)):
        (folder / f"ckpt-{step:08d}.pt").write_bytes(b"x")
        os.utime(folder / f"ckpt-{step:08d}.pt", (when, when))
    (folder / "notes.txt").write_bytes(b"not a checkpoint")
    assert executors.saved_since(out, 1_500_000.0) == "ckpt-00000012.pt"
    assert executors.saved_since(out, 2_000_000.0) == "ckpt-00000012.pt"  # written at that very time
    assert executors.saved_since(out, 2_000_001.0) == ""  # the newest is older: nothing new
    # the newest one rotated away between listing and reading: nothing to name
    monkeypatch.setattr(executors, "checkpoint_paths", lambda where: [where / "ckpt-00000099.pt"])
    assert executors.saved_since(out, 0.0) == ""


class FakeAutoExecutor:
    """submitit.AutoExecutor, recording what it is made with and given."""

    made: list = []

    def __init__(self, **kwargs):
        self.made.append(kwargs)
        self.parameters = None

    def update_parameters(self, **kwargs):
        assert self.parameters is None, "parameters are given once"
        self.parameters = kwargs


def test_make_executor_passes_the_resources_to_submitit(tmp_path, monkeypatch):
    import submitit

    from clipstudy.study.resources import Resources

    monkeypatch.setattr(FakeAutoExecutor, "made", [])
    monkeypatch.setattr(submitit, "AutoExecutor", FakeAutoExecutor)
    local = executors.make_executor("local", tmp_path / "sub", Resources(time_min=30, max_requeues=4))
    assert FakeAutoExecutor.made == [{"folder": str(tmp_path / "sub"), "cluster": "local", "local_max_num_timeout": 4}]
    # no GPU, no CPU or memory request: left out (the executor's defaults)
    assert local.parameters == {"timeout_min": 30, "nodes": 1, "tasks_per_node": 1}
    res = Resources(
        gpus_per_node=2,
        nodes=3,
        cpus_per_task=8,
        mem_gb=64.0,
        time_min=90,
        partition="gpu",
        account="study",
        sbatch={"qos": "high"},
        parallel=5,
        max_requeues=7,
    )
    slurm = executors.make_executor("slurm", tmp_path / "s", res)
    assert FakeAutoExecutor.made[-1] == {"folder": str(tmp_path / "s"), "cluster": "slurm", "slurm_max_num_timeout": 7}
    assert slurm.parameters == {
        "timeout_min": 90,
        "nodes": 3,
        "tasks_per_node": 2,
        "gpus_per_node": 2,
        "cpus_per_task": 8,
        "mem_gb": 64.0,
        "name": "clipstudy",
        "slurm_array_parallelism": 5,
        "slurm_additional_parameters": {"requeue": True, "qos": "high"},
        "slurm_partition": "gpu",
        "slurm_account": "study",
    }
    bare = executors.make_executor("slurm", tmp_path / "b", Resources(time_min=10, procs_per_node=4))
    assert bare.parameters == {
        "timeout_min": 10,
        "nodes": 1,
        "tasks_per_node": 4,
        "name": "clipstudy",
        "slurm_array_parallelism": 256,  # every cell of the array at once
        "slurm_additional_parameters": {"requeue": True},
    }
    # a local executor gets none of the Slurm parameters, even when they are set
    assert executors.make_executor("local", tmp_path / "l", res).parameters == {
        "timeout_min": 90,
        "nodes": 3,
        "tasks_per_node": 2,
        "gpus_per_node": 2,
        "cpus_per_task": 8,
        "mem_gb": 64.0,
    }
