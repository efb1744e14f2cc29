"""The sweep on a real single-node Slurm (Debian's slurm-wlm, started by scripts/slurm-local.sh), with and without
accounting (slurmdbd): one job array for two cells, --status and a rerun that need no repeated option and submit
nothing while the jobs are queued, running or requeued, Slurm's own requeue (SIGTERM), submitit's (USR2), a time
limit, a refused submission and a job that pends on its partition's time limit.

Marked ``slurm`` and deselected by default; ``make test-slurm`` (and .ci/run) runs them. They start the cluster
themselves (as root they install the packages when missing) and stop it at the end. Slurm holds a requeued job
about 2 minutes (BeginTime) before it may start again; the tests start it at once with ``scontrol update
StartTime=now`` after checking what the sweep says meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_executors import comparable, history_losses, reference, resumed_step
from test_faults import completed, has_full_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "slurm-local.sh"
EPOCHS = 100  # a cell of the array: about 30 s of training, so both cells are still training when stopped
# (with 30 epochs an idle CI machine finished one cell while the test was requeuing the other)
LONG_EPOCHS = 200  # the time-limit cell: about a minute of training on one CPU, so a 2-minute job is cut once


class Cluster:
    """The running cluster: its environment (SLURM_CONF) and commands run against it."""

    def __init__(self, folder: Path, accounting: bool):
        self.folder, self.accounting = folder, accounting
        self.env = {**os.environ, "SLURM_LOCAL_DIR": str(folder), "SLURM_CONF": str(folder / "slurm.conf")}

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True, timeout=timeout)

    def sweep(self, *args, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "clipstudy", "sweep", *map(str, args)],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def start_sweep(self, args, log: Path, cwd: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "clipstudy", "sweep", *map(str, args)],
                env=self.env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def queue(self) -> dict[str, tuple[str, str]]:
        """Job id -> (state, reason) of every job Slurm holds."""
        out = self.run("squeue", "-h", "-r", "-o", "%i|%T|%r").stdout
        return {i: (s, r) for i, s, r in (line.split("|") for line in out.splitlines() if line.count("|") == 2)}

    def start_now(self, job_id: str) -> None:
        """Start a requeued job now instead of after Slurm's ~2-minute hold."""
        done = self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module", params=[False, True], ids=["no-accounting", "accounting"])
def cluster(request, tmp_path_factory):
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.fail("Slurm is not installed: run `sudo scripts/slurm-local.sh install` (Debian's slurm-wlm, munge)")
    folder = tmp_path_factory.mktemp("slurm-acct" if request.param else "slurm")
    cluster = Cluster(folder, request.param)
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", *(["--accounting"] if request.param else [])],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    yield cluster
    subprocess.run(["bash", str(SCRIPT), "stop"], env=cluster.env, capture_output=True, timeout=120)


@pytest.fixture
def queue_emptied(cluster):
    """No job of a test outlives it."""
    yield
    cluster.run("scancel", "--user", "root")


@pytest.fixture(scope="module")
def references(demo_data_dir, tmp_path_factory):
    """The array's two cells trained in this process, never interrupted: what every resumed cell must equal."""
    folder = tmp_path_factory.mktemp("reference")
    for loss in ("clip", "sogclr"):
        reference(demo_data_dir, folder / loss, loss=loss, epochs=EPOCHS)
    return folder


class StatusWatch:
    """Every status the runs' metrics.json files show while a test runs (read every 50 ms, from a thread)."""

    def __init__(self, runs: Path):
        self.runs, self.seen, self._stop = runs, set(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.05):
            for path in self.runs.glob("*/metrics.json"):
                self.seen.add((path.parent.name, metrics(path.parent).get("status", "")))

    def stop(self) -> set:
        self._stop.set()
        self._thread.join()
        return self.seen


def until(condition, what: str, proc: subprocess.Popen | None = None, log: Path | None = None, timeout=240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline or (proc is not None and proc.poll() is not None):
            pytest.fail(f"{what}: not reached" + (f"; the sweep said:\n{log.read_text()}" if log else ""))
        time.sleep(0.05)


def metrics(run: Path) -> dict:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def line_of(text: str, cell: str) -> str:
    found = [line for line in text.splitlines() if line.startswith(cell + " ")]
    assert found, f"no line for {cell} in\n{text}"
    return found[0]


def sweep_args(data: Path, runs: Path, losses: str, epochs: int, *extra) -> list:
    return [
        *("--profile", "smoke", "--data", data, "--runs", runs, "--optimizers", "adamw", "--losses", losses),
        *("--set", f"epochs={epochs}", "--executor", "slurm", *extra),
    ]


def interrupt(cluster, job_id: str, run: Path, command: list[str], waiter, log) -> None:
    """``command JOB`` to a running cell as soon as it has a checkpoint."""
    until(lambda: has_full_checkpoint(run), f"{run.name}: a checkpoint", waiter, log)
    done = cluster.run(*command, job_id)
    assert done.returncode == 0, done.stderr
    assert not completed(run), f"{run.name} finished before it could be interrupted"


def see_requeued(cluster, job_id: str, run: Path, waiter, log, tmp_path, *, records: tuple[str, ...]) -> None:
    """While Slurm holds the requeued job, the cell's record, --status, a rerun and --wait call it requeued, never
    failed; then the job starts at once."""
    held = lambda: cluster.queue().get(job_id) == ("PENDING", "BeginTime")  # noqa: E731
    until(lambda: held() or metrics(run).get("status") == "failed", f"{job_id} requeued", waiter, log)
    assert metrics(run).get("status", "") in records, metrics(run)
    status = cluster.sweep("--runs", run.parent, "--status", cwd=tmp_path)
    assert re.search(rf"\s+requeued\s+{job_id}\s+PENDING \(BeginTime\)", line_of(status.stdout, run.name)), status
    rerun = cluster.sweep("--runs", run.parent, cwd=tmp_path)
    assert rerun.returncode == 0 and f"its Slurm job {job_id} is still PENDING (BeginTime)" in rerun.stdout, rerun
    until(lambda: f"requeued (job {job_id} PENDING (BeginTime))" in log.read_text(), "--wait saw it", waiter, log)
    cluster.start_now(job_id)


def test_array_status_rerun_requeue_usr2_and_wait(cluster, references, queue_emptied, demo_data_dir, tmp_path):
    runs = tmp_path / "runs"
    clip, sogclr = runs / "adamw-clip-s0", runs / "adamw-sogclr-s0"
    log = tmp_path / "wait.log"
    runs.mkdir()
    watch = StatusWatch(runs)
    waiter = cluster.start_sweep(sweep_args(demo_data_dir, runs, "clip,sogclr", EPOCHS, "--wait"), log, tmp_path)
    until(lambda: (clip / "job.json").exists() and (sogclr / "job.json").exists(), "submitted", waiter, log)
    ids = [json.loads((run / "job.json").read_text())["job_id"] for run in (clip, sogclr)]
    base = ids[0].split("_")[0]
    assert ids == [f"{base}_0", f"{base}_1"], ids  # one array

    # --status and a rerun of the folder need no option but --runs; the rerun submits nothing
    status = cluster.sweep("--runs", runs, "--status", cwd=tmp_path)
    for run, job_id in zip((clip, sogclr), ids):
        line = line_of(status.stdout, run.name)
        assert re.search(rf"\s+(queued|running)\s+{job_id}\s+(PENDING|RUNNING)", line), status.stdout
    assert status.returncode == 0 and "stale" not in status.stdout
    rerun = cluster.sweep("--runs", runs, cwd=tmp_path)
    assert rerun.returncode == 0 and rerun.stdout.count("not submitted: its Slurm job") == 2, rerun
    assert set(cluster.queue()) == set(ids)

    # Slurm's own requeue (as PreemptMode=REQUEUE does) sends SIGTERM: the cell records an interruption, not a
    # failure; USR2 (as before a time limit) goes through submitit's checkpoint and requeue
    # both are stopped as soon as both have a checkpoint, one right after the other
    until(lambda: has_full_checkpoint(clip) and has_full_checkpoint(sogclr), "both checkpointed", waiter, log)
    interrupt(cluster, ids[0], clip, ["scontrol", "requeue"], waiter, log)
    interrupt(cluster, ids[1], sogclr, ["scancel", "--signal=USR2"], waiter, log)
    see_requeued(cluster, ids[0], clip, waiter, log, tmp_path, records=("interrupted",))
    # USR2: submitit requeues from within the task once training has checkpointed, before anything is recorded
    see_requeued(cluster, ids[1], sogclr, waiter, log, tmp_path, records=("", "interrupted"))

    assert waiter.wait(timeout=400) == 0, log.read_text()
    assert not {seen for seen in watch.stop() if seen[1] == "failed"}, "a requeued cell was recorded as failed"
    said = log.read_text()
    assert "FAILED" not in said and "sweep finished in" in said and "2 completed" in said, said
    for run, loss in ((clip, "clip"), (sogclr, "sogclr")):
        assert re.search(rf"^{run.name}\s+completed", said, re.M), said
        assert resumed_step(run) > 0  # resumed from its checkpoint, not restarted
        assert comparable(metrics(run)) == comparable(metrics(references / loss))
        assert history_losses(run) == history_losses(references / loss)
    assert "Bypassing signal SIGTERM" in (clip / "job.out").read_text()  # the SIGTERM reached the task ...
    assert "Requeued job" in (sogclr / "job.out").read_text()  # ... and USR2 went through submitit's requeue

    # after the end: done; accounting knows the jobs completed, without it Slurm has forgotten them
    status = cluster.sweep("--runs", runs, "--status", cwd=tmp_path)
    for run, job_id in zip((clip, sogclr), ids):
        shown = "COMPLETED" if cluster.accounting else "gone"
        assert re.search(rf"\s+done\s+{job_id}\s+{shown}\s", line_of(status.stdout, run.name)), status.stdout
    rerun = cluster.sweep("--runs", runs, cwd=tmp_path)
    assert rerun.returncode == 0 and rerun.stdout.count("skipped (done") == 2 and not cluster.queue(), rerun


@pytest.fixture
def prompt_requeues(cluster):
    """Start every requeued job at once (Slurm would hold it about 2 minutes), from a thread, while a test runs."""
    stop = threading.Event()

    def release():
        while not stop.wait(0.5):
            for job_id, (state, reason) in cluster.queue().items():
                if state == "PENDING" and reason == "BeginTime":
                    cluster.start_now(job_id)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()


@pytest.mark.parametrize("cluster", [False], indirect=True, ids=["no-accounting"])
def test_a_time_limit_requeues_from_the_checkpoint_and_the_cell_goes_on(
    cluster, queue_emptied, prompt_requeues, demo_data_dir, tmp_path
):
    """A 2-minute job whose cell trains for longer: USR2 90 s before the limit, submitit checkpoints and requeues
    (a time-out, counted against --max-requeues), the next run resumes; the cell ends equal to an uninterrupted
    run trained meanwhile beside it. Its torch threads are the allocation's (one CPU), not this machine's."""
    runs, ref = tmp_path / "runs", tmp_path / "reference"
    run = runs / "adamw-clip-s0"
    uninterrupted = subprocess.Popen(
        [sys.executable, "-m", "clipstudy", "train", "--profile", "smoke", "--data", demo_data_dir, "--out", ref]
        + ["--optimizer", "adamw", "--loss", "clip", "--epochs", str(LONG_EPOCHS), "--threads", "1", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "wait.log"
    # USR2 90 s before the 2-minute limit, i.e. 30 s into each job: well inside the cell's minute of training
    # even on an idle machine (with USR2@60 an idle machine finished the cell before the signal came)
    args = sweep_args(demo_data_dir, runs, "clip", LONG_EPOCHS, "--time", "2", "--sbatch", "signal=USR2@90", "--wait")
    runs.mkdir()
    watch = StatusWatch(runs)
    waiter = cluster.start_sweep(args, log, tmp_path)
    assert waiter.wait(timeout=600) == 0, log.read_text()
    assert watch.stop() <= {(run.name, "interrupted"), (run.name, "completed")}, watch.seen
    assert uninterrupted.wait(timeout=600) == 0
    said, job_log = log.read_text(), (run / "job.out").read_text()
    assert re.search(r"^adamw-clip-s0\s+completed", said, re.M) and "FAILED" not in said, said
    assert "this job is timed-out" in job_log and "Requeued job" in job_log, job_log[-3000:]
    assert resumed_step(run) > 0
    assert comparable(metrics(run)) == comparable(metrics(ref)) and history_losses(run) == history_losses(ref)
    device = json.loads((run / "config.json").read_text())["device"]
    assert device["torch_threads"] == 1, device  # Slurm gave the task one CPU (this machine has cpu_count of them)


@pytest.mark.parametrize("cluster", [False], indirect=True, ids=["no-accounting"])
def test_a_refused_submission_and_a_job_pending_on_its_partitions_limit(
    cluster, queue_emptied, demo_data_dir, tmp_path
):
    runs = tmp_path / "runs"
    refused = cluster.sweep(*sweep_args(demo_data_dir, runs, "clip", 1, "--partition", "nosuch"), cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: sbatch refused the job array: ") and "nosuch" in refused.stderr
    assert not (runs / "adamw-clip-s0" / "job.json").exists() and not cluster.queue()
    # the partition `short` allows 1 minute; the default --time (1440) is accepted by sbatch and pends forever
    assert (
        cluster.sweep(*sweep_args(demo_data_dir, runs, "clip", 1, "--partition", "short"), cwd=tmp_path).returncode == 0
    )
    job_id = json.loads((runs / "adamw-clip-s0" / "job.json").read_text())["job_id"]
    until(lambda: cluster.queue().get(job_id) == ("PENDING", "PartitionTimeLimit"), "pending on the limit")
    status = cluster.sweep("--runs", runs, "--status", cwd=tmp_path)
    line = line_of(status.stdout, "adamw-clip-s0")
    assert re.search(rf"queued\s+{job_id}\s+PENDING \(PartitionTimeLimit\)\s", line), line
    assert "--time is above the partition's time limit" in line
