"""Where the sweep's cells run: ``inline`` (this process), ``local`` or ``slurm`` (through submitit).

Whatever the executor, the unit of work is the same: :func:`clipstudy.study.cells.run_cell`
executes ``notebooks/train.ipynb`` with papermill into the cell's run
directory. ``local`` runs each cell as a job of submitit's local executor (real
subprocesses, ``--jobs`` at a time); ``slurm`` submits every unfinished cell as
one Slurm job array. A submitted cell records ``job.json`` (executor, job id,
log files) in its run directory, with ``job.out`` / ``job.err`` linking to
submitit's logs, so ``sweep --status`` can show each cell's job and log.

Preemption and time limits: :class:`CellTask` has submitit's ``checkpoint``
method. When Slurm (or the local executor's time limit) signals the job,
submitit calls it; it asks the training kernel to stop (SIGTERM: training
writes a checkpoint and releases the cell) and returns the same task, which
submitit requeues; the requeued task resumes from that checkpoint, up to
``--max-requeues`` time limits (preemptions do not count). A signal that comes
after training has ended requeues nothing. Slurm's own requeue (``scontrol
requeue``, ``PreemptMode=REQUEUE``) sends SIGTERM instead: training checkpoints,
the cell records ``interrupted`` and Slurm runs the job again. Job records,
``--status`` and ``--wait`` are in :mod:`clipstudy.study.jobs`; docs/slurm.md
tells the whole story.

Multi-process cells (``--gpus-per-cell N``, ``--nodes M`` or
``--procs-per-node N``): every task of the job calls :class:`CellTask`; submitit's
``TorchDistributedEnvironment`` exports ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``,
rank 0 runs the notebook (its kernel inherits the environment) and the other
ranks call ``train`` directly. The inline executor starts the same ranks with
torchrun.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from clipstudy.engine import records
from clipstudy.engine.checkpoint import checkpoint_paths
from clipstudy.engine.config import ConfigError
from clipstudy.fileio import LOCK_NAME, is_locked
from clipstudy.study.cells import (
    Cell,
    cell_state,
    record_state,
    run_cell,
    run_config,
    scheduler_stopping,
    summary_line,
)
from clipstudy.study.jobs import active_slurm_job, read_job, record_job, scheduler_states, wait_for_jobs
from clipstudy.study.resources import Resources


# ----------------------------------------------------------------- the task
def distributed_rank() -> int:
    """Export the torch.distributed environment of a multi-task submitit job; return this task's rank."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    try:
        tasks = JobEnvironment().num_tasks
    except RuntimeError:  # not inside a submitit job (torchrun or a plain process)
        return int(os.environ.get("RANK", "0"))
    if tasks > 1:
        # the device of a rank is chosen by LOCAL_RANK in build_run, so every task keeps all its GPUs
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return int(os.environ.get("RANK", "0"))


class CellTask:
    """One sweep cell as a submitit callable (picklable; a requeued job calls it again)."""

    def __init__(self, cell, device: str | None = None, threads: int | None = None):
        self.cell, self.device, self.threads = cell, device, threads

    def __call__(self) -> dict:
        from submitit.core.utils import UncompletedJobError

        threads = self.threads or allocation_threads()
        rank = distributed_rank()
        try:
            if rank == 0:
                return run_cell(self.cell, device=self.device, threads=threads)
            return train_rank(self.cell, self.device, threads)
        except UncompletedJobError:  # submitit's "not requeued" from a signal after training had ended
            metrics = records.read_metrics(self.cell.out)
            if rank == 0 and records.is_finished(metrics):
                return metrics
            raise

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or time-out: checkpoint now, then be requeued as is; nothing to
        requeue (None) when training has already ended."""
        from submitit import JobEnvironment
        from submitit.helpers import DelayedSubmission

        state = record_state(self.cell.out, self.cell.config)[0]
        if state in ("done", "diverged"):
            print(f"{self.cell.name}: the scheduler's signal came after training ended ({state}); not requeued")
            return None
        scheduler_stopping("stopped by the scheduler's signal (preemption or time limit) to be requeued")
        # within the 90 s between Slurm's USR2 and its kill: up to 30 s for the kernel alone, 40 s after SIGTERM
        stop_kernels(self.cell.out, grace_s=30.0 if JobEnvironment().cluster == "slurm" else 0.0, timeout_s=40.0)
        return DelayedSubmission(CellTask(self.cell, self.device, self.threads))


def allocation_threads(environ=None) -> int | None:
    """Torch threads of a Slurm task: the CPUs Slurm gave it (``SLURM_CPUS_PER_TASK``, else the node's CPUs
    shared by its tasks), never more than the CPUs it may run on (``os.sched_getaffinity``); None outside Slurm
    (the submitter chose)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return None
    if env.get("SLURM_CPUS_PER_TASK"):
        cpus = int(env["SLURM_CPUS_PER_TASK"])
    else:
        tasks = int(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_NTASKS") or 1)
        cpus = int(env.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1) // max(1, tasks)
    return max(1, min(cpus, len(os.sched_getaffinity(0))))


def train_rank(cell, device, threads) -> dict:
    """A rank other than 0 of a multi-process cell: the same training, without the notebook."""
    from clipstudy.engine.train import train

    train(run_config(cell, device, threads), progress=False)
    return {"rank": int(os.environ.get("RANK", "0"))}


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc): the notebook kernel papermill started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def saved_since(out: Path, when: float) -> str:
    """The newest checkpoint of the run if it was written after ``when``, else ""."""
    for path in checkpoint_paths(out / "checkpoints")[:1]:
        try:
            return path.name if path.stat().st_mtime >= when else ""
        except OSError:  # rotated away meanwhile
            return ""
    return ""


def stop_kernels(out: Path, *, grace_s: float = 0.0, timeout_s: float = 60.0) -> None:
    """Have the training kernel checkpoint and stop; return once the cell's lock is released.

    On Slurm every process of the job step gets USR2, the kernel included, and
    training stops on it by itself: wait ``grace_s`` for that first, since a
    second signal would interrupt the checkpoint it is writing. Then (and at
    once under the local executor, which signals only the task) SIGTERM this
    process's children, the kernel papermill started.
    """
    signalled = time.time()
    deadline = signalled + grace_s
    while is_locked(out, LOCK_NAME) and time.time() < deadline:
        time.sleep(0.2)
    if not is_locked(out, LOCK_NAME):
        saved = saved_since(out, signalled - 1)
        what = f"checkpointed ({saved}) and stopped" if saved else "was not running (no new checkpoint)"
        print(f"{out.name}: training {what} on the scheduler's signal", flush=True)  # submitit says if it requeues
        return
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout_s
    while is_locked(out, LOCK_NAME) and time.time() < deadline:
        time.sleep(0.2)
    print(
        f"{out.name}: "
        + (
            "training still running 40 s after SIGTERM: its newest checkpoint is used"
            if is_locked(out, LOCK_NAME)
            else "training checkpointed and stopped"
        ),
        flush=True,
    )


# ------------------------------------------------------------ the executors
def make_executor(kind: str, folder: Path, res: Resources):
    """A submitit executor for ``kind`` ("local" or "slurm") with the cell's resources."""
    import submitit

    # max_num_timeout: how many time limits a checkpointable task may run into (submitit's default: 3)
    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind, **{f"{kind}_max_num_timeout": res.max_requeues})
    params = dict(
        timeout_min=res.time_min,
        nodes=res.nodes,
        tasks_per_node=res.tasks_per_node,
        gpus_per_node=res.gpus_per_node or None,
    )
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if kind == "slurm":
        params.update(
            name="clipstudy",
            slurm_array_parallelism=res.parallel or 256,
            # requeue: a preempted or timed-out task comes back under the same job id
            slurm_additional_parameters={"requeue": True, **res.sbatch},
        )
        if res.partition:
            params["slurm_partition"] = res.partition
        if res.account:
            params["slurm_account"] = res.account
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def cell_threads(res: Resources, jobs: int) -> int | None:
    """Torch threads per rank on a CPU of this machine: the cores asked for, or this machine's shared among the
    cells (a Slurm task decides on its node instead: :func:`allocation_threads`)."""
    if res.cpus_per_task:
        return res.cpus_per_task
    return max(1, (os.cpu_count() or 1) // max(1, jobs * res.tasks_per_node))


def submit_cells(kind: str, cells: list, res: Resources, folder: Path, *, device: str | None = None) -> list:
    """Submit ``cells`` (slurm: one job array); record each job in its cell's directory; return the jobs."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    executor = make_executor(kind, folder, res)
    # slurm: None, the task takes its allocation's CPUs (allocation_threads) on the node it lands on
    threads = None if res.gpus_per_node or kind == "slurm" else cell_threads(res, res.parallel or len(cells))
    tasks = [CellTask(cell, device, threads) for cell in cells]
    said = io.StringIO()  # submitit echoes sbatch's stderr: it goes into the one-line error instead
    try:
        with contextlib.redirect_stderr(said), executor.batch():
            jobs = [executor.submit(task) for task in tasks]
    except (FailedJobError, FailedSubmissionError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        said = [line.removeprefix("sbatch: error: ") for line in lines if line.startswith("sbatch: error: ")]
        raise ConfigError(
            f"sbatch refused the job array: {'; '.join(dict.fromkeys(said)) or lines[-1]}; "
            "check --partition, --account, --time, --gpus-per-cell, "
            "--mem-gb and --sbatch against the cluster (`sinfo -s`); nothing was submitted"
        ) from None
    for cell, job in zip(cells, jobs):
        record_job(cell, kind, job)
    return jobs


def run_local(cells: list, res: Resources, folder: Path, *, jobs: int = 1, device: str | None = None) -> dict:
    """Run ``cells`` through submitit's local executor, ``jobs`` at a time; return cell name -> metrics."""

    results, running, todo = {}, [], list(cells)
    executor = make_executor("local", folder, res)
    threads = None if res.gpus_per_node else cell_threads(res, jobs)
    while todo or running:
        while todo and len(running) < jobs:
            cell = todo.pop(0)
            job = executor.submit(CellTask(cell, device, threads))
            record_job(cell, "local", job)
            running.append((cell, job))
        time.sleep(0.2)
        for cell, job in [(c, j) for c, j in running if j.done()]:
            running.remove((cell, job))
            try:
                metrics = job.results()[0]
            except Exception as err:  # the job died (killed, out of memory): the next sweep resumes it
                metrics = {"status": "failed", "error": f"job {job.job_id}: {str(err).strip().splitlines()[-1]}"}
            results[cell.name] = metrics
            print(summary_line(cell, metrics), flush=True)
    return results


def run_torchrun(cell, res: Resources, *, device: str | None = None) -> dict:
    """The inline executor's multi-process cell: torchrun starts the ranks of :func:`main` on this machine."""
    spec = json.dumps(
        {
            "cell": {**asdict(cell), "out": str(cell.out)},
            "device": device,
            "threads": None if res.gpus_per_node else cell_threads(res, 1),
        }
    )
    started = time.perf_counter()
    log = cell.out / "torchrun.log"
    cell.out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={res.tasks_per_node}",
                "-m",
                "clipstudy.study.executors",
                spec,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    metrics = records.read_metrics(cell.out) or {}
    if code and metrics.get("status") not in (*records.FINISHED, records.FAILED):
        metrics = {"status": "failed", "error": f"torchrun exited with {code}; see {log}"}
    return {**metrics, "sweep_wall_s": time.perf_counter() - started}


def run_cells(
    kind: str,
    cells: list,
    res: Resources,
    runs_root: Path,
    *,
    jobs: int = 1,
    wait: bool = False,
    device: str | None = None,
) -> dict | None:
    """Run (local, inline multi-process) or submit (slurm) ``cells``; return cell name -> metrics, or None
    when Slurm jobs were submitted without waiting."""

    folder = runs_root / ".submitit"  # submitit names every file by job id; job.out/job.err link into it
    if kind == "local":
        return run_local(cells, res, folder, jobs=jobs, device=device)
    if kind == "inline":  # only multi-process cells come here; one-process cells run in run_sweep
        results = {}
        for cell in cells:
            results[cell.name] = run_torchrun(cell, res, device=device)
            print(summary_line(cell, results[cell.name]), flush=True)
        return results
    return submit_slurm(cells, res, folder, wait=wait, device=device)


def submit_slurm(cells: list, res: Resources, folder: Path, *, wait: bool, device: str | None) -> dict | None:
    """Submit the cells whose job is not still queued, running or requeued (one array); with ``wait``, wait for
    those and the submitted ones."""
    job_records = {cell.name: read_job(cell.out) for cell in cells}
    states = scheduler_states([r for r in job_records.values() if r.get("executor") == "slurm"])
    active = [cell for cell in cells if active_slurm_job(job_records[cell.name], states)]
    busy = [cell for cell in cells if cell not in active and cell_state(cell.out)[0] == "running"]
    for cell in active:
        job_id = job_records[cell.name]["job_id"]
        print(f"{cell.name:<28} not submitted: its Slurm job {job_id} is still {states[job_id].describe()}")
    for cell in busy:
        print(f"{cell.name:<28} not submitted: running in another process")
    submitted = [cell for cell in cells if cell not in active and cell not in busy]
    for cell in submitted:
        cell.out.mkdir(parents=True, exist_ok=True)
    job_list = submit_cells("slurm", submitted, res, folder, device=device) if submitted else []
    for cell, job in zip(submitted, job_list):
        print(f"{cell.name:<28} submitted as Slurm job {job.job_id}; log {cell.out / 'job.out'}", flush=True)
    if not wait:
        print("watch with: python -m clipstudy sweep --status --runs RUNS; logs: RUN_DIR/job.out")
        return None
    return wait_for_jobs(active + submitted)


def main(argv: list[str]) -> int:
    """One rank of an inline multi-process cell (started by torchrun from :func:`run_torchrun`)."""

    spec = json.loads(argv[0])
    from clipstudy.engine.config import config_from_dict

    config = config_from_dict(spec["cell"]["config"])
    cell = Cell(**{**spec["cell"], "out": Path(spec["cell"]["out"]), "config": config})
    CellTask(cell, spec["device"], spec["threads"])()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
