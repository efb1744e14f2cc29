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
submitit requeues; the requeued task resumes from that checkpoint.

Multi-process cells (``--gpus-per-cell N``, ``--nodes M`` or
``--procs-per-node N``): every task of the job calls :class:`CellTask`; submitit's
``TorchDistributedEnvironment`` exports ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``,
rank 0 runs the notebook (its kernel inherits the environment) and the other
ranks call ``train`` directly. The inline executor starts the same ranks with
torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipstudy.engine import records
from clipstudy.engine.config import ConfigError
from clipstudy.fileio import LOCK_NAME, is_locked, write_json
from clipstudy.study.cells import Cell, cell_state, parse_mapping, run_cell, run_config, summary_line

EXECUTORS = ("inline", "local", "slurm")
JOB_RECORD = "job.json"
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")


@dataclass
class Resources:
    """What one cell asks for; the fields map onto submitit's executor parameters."""

    gpus_per_node: int = 0
    procs_per_node: int = 0  # processes (DDP ranks) per node; 0 = one per GPU, or 1
    nodes: int = 1
    cpus_per_task: int = 0  # 0 = the executor's default
    mem_gb: float = 0.0  # 0 = the partition's default
    time_min: int = 24 * 60
    partition: str = ""
    account: str = ""
    sbatch: dict = field(default_factory=dict)  # extra #SBATCH parameters, e.g. {"qos": "high"}
    parallel: int = 0  # cells running at once (local: --jobs; slurm: array parallelism, 0 = all)

    @property
    def tasks_per_node(self) -> int:
        return self.procs_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.tasks_per_node * self.nodes


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

        rank = distributed_rank()
        if rank == 0:
            return run_cell(self.cell, device=self.device, threads=self.threads)
        return train_rank(self.cell, self.device, self.threads)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or time-out: checkpoint now, then be requeued as is."""
        from submitit import JobEnvironment
        from submitit.helpers import DelayedSubmission

        # within the 90 s between Slurm's USR2 and its kill: up to 30 s for the kernel alone, 40 s after SIGTERM
        stop_kernels(self.cell.out, grace_s=30.0 if JobEnvironment().cluster == "slurm" else 0.0, timeout_s=40.0)
        return DelayedSubmission(CellTask(self.cell, self.device, self.threads))


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


def stop_kernels(out: Path, *, grace_s: float = 0.0, timeout_s: float = 60.0) -> None:
    """Have the training kernel checkpoint and stop; return once the cell's lock is released.

    On Slurm every process of the job step gets USR2, the kernel included, and
    training stops on it by itself: wait ``grace_s`` for that first, since a
    second signal would interrupt the checkpoint it is writing. Then (and at
    once under the local executor, which signals only the task) SIGTERM this
    process's children, the kernel papermill started.
    """
    deadline = time.time() + grace_s
    while is_locked(out, LOCK_NAME) and time.time() < deadline:
        time.sleep(0.2)
    if not is_locked(out, LOCK_NAME):
        print(f"{out.name}: training checkpointed and stopped on the scheduler's signal; requeuing", flush=True)
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
            "training still running after SIGTERM; requeued anyway"
            if is_locked(out, LOCK_NAME)
            else "training checkpointed and stopped; requeuing"
        ),
        flush=True,
    )


# ------------------------------------------------------------ the executors
def make_executor(kind: str, folder: Path, res: Resources):
    """A submitit executor for ``kind`` ("local" or "slurm") with the cell's resources."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind)
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


def record_job(cell, kind: str, job) -> None:
    """``job.json`` and links to the job's logs in the cell's run directory."""
    paths = job.paths
    write_json(
        cell.out / JOB_RECORD,
        {
            "executor": kind,
            "job_id": job.job_id,
            "folder": str(paths.folder),
            "stdout": str(paths.stdout),
            "stderr": str(paths.stderr),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    for name, target in (("job.out", paths.stdout), ("job.err", paths.stderr)):
        link = cell.out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)


def read_job(out: Path) -> dict:
    try:
        return json.loads((out / JOB_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def job_state(record: dict) -> str:
    """The scheduler's view of a recorded job: Slurm's state from sacct, or whether a local job lives."""
    if not record:
        return ""
    if record["executor"] == "slurm":
        import submitit

        return submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"]).state
    return "RUNNING" if Path(f"/proc/{record['job_id']}").exists() else "EXITED"


def cell_threads(res: Resources, jobs: int) -> int | None:
    """Torch threads per rank on a CPU: the cores asked for, or this machine's shared among the cells."""
    if res.cpus_per_task:
        return res.cpus_per_task
    return max(1, (os.cpu_count() or 1) // max(1, jobs * res.tasks_per_node))


def submit_cells(kind: str, cells: list, res: Resources, folder: Path, *, device: str | None = None) -> list:
    """Submit ``cells`` (slurm: one job array); record each job in its cell's directory; return the jobs."""
    executor = make_executor(kind, folder, res)
    threads = None if res.gpus_per_node else cell_threads(res, res.parallel or len(cells))
    tasks = [CellTask(cell, device, threads) for cell in cells]
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
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


def active_elsewhere(cell) -> bool:
    """Whether the cell's recorded Slurm job is still queued or running (then it is not submitted again)."""
    record = read_job(cell.out)
    return record.get("executor") == "slurm" and job_state(record).split()[0] in ACTIVE_SLURM_STATES


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
    submitted = [cell for cell in cells if not active_elsewhere(cell)]
    for cell in cells:
        if cell not in submitted:
            print(f"{cell.name:<28} skipped (its Slurm job {read_job(cell.out)['job_id']} is still active)")
    for cell in submitted:
        cell.out.mkdir(parents=True, exist_ok=True)
    job_list = submit_cells("slurm", submitted, res, folder, device=device) if submitted else []
    for cell, job in zip(submitted, job_list):
        print(f"{cell.name:<28} submitted as Slurm job {job.job_id}; log {cell.out / 'job.out'}", flush=True)
    if not wait:
        print("watch with: python -m clipstudy sweep --status (same options); logs: RUN_DIR/job.out")
        return None
    results = {}
    for cell, job in zip(submitted, job_list):
        try:
            results[cell.name] = job.results()[0]
        except Exception as err:
            results[cell.name] = {"status": "failed", "error": f"job {job.job_id}: {str(err).strip()[-200:]}"}
        print(summary_line(cell, results[cell.name]), flush=True)
    return results


def print_status(cells: list) -> None:
    """One line per cell: its state on disk, its job (id and scheduler state) and its log file."""

    print(f"{'cell':<28} {'state':<9} {'job':<14} {'job state':<11} {'log':<40} detail")
    for cell in cells:
        state, detail = cell_state(cell.out, cell.config)
        record = read_job(cell.out)
        log = str(cell.out / "job.out") if record else ""
        print(
            f"{cell.name:<28} {state:<9} {record.get('job_id', '-'):<14} {job_state(record) or '-':<11} "
            f"{log or '-':<40} {detail}"
        )


def resources_from_args(args) -> Resources:

    res = Resources(
        gpus_per_node=args.gpus_per_cell,
        procs_per_node=args.procs_per_node,
        nodes=args.nodes,
        cpus_per_task=args.cpus_per_cell,
        mem_gb=args.mem_gb,
        time_min=args.time,
        partition=args.partition,
        account=args.account,
        sbatch=parse_mapping(",".join(args.sbatch), "--sbatch"),
        parallel=args.max_running if args.executor == "slurm" else args.jobs,
    )
    for name in ("gpus_per_node", "procs_per_node", "cpus_per_task", "mem_gb"):
        if getattr(res, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0")
    if res.nodes < 1 or res.time_min < 1:
        raise ConfigError("--nodes and --time must be >= 1")
    if res.nodes > 1 and args.executor != "slurm":
        raise ConfigError(f"--nodes {res.nodes}: several nodes need --executor slurm")
    return res


def add_arguments(parser) -> None:
    """The sweep's executor options."""
    group = parser.add_argument_group("where cells run")
    group.add_argument(
        "--executor",
        default=os.environ.get("EXECUTOR", "inline"),
        choices=EXECUTORS,
        help="inline: this process (default); local: submitit subprocesses; slurm: one job array",
    )
    group.add_argument("--status", action="store_true", help="each cell's state, job id and log file; run nothing")
    group.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and print their results")
    group.add_argument("--partition", default="", help="slurm partition")
    group.add_argument("--account", default="", help="slurm account")
    group.add_argument("--time", type=int, default=24 * 60, help="time limit per cell in minutes (default 1440)")
    group.add_argument("--gpus-per-cell", type=int, default=0, help="GPUs per node for each cell (>1: DDP)")
    group.add_argument(
        "--procs-per-node",
        type=int,
        default=0,
        help="DDP processes per node (default one per GPU, or 1); >1 on a CPU runs gloo",
    )
    group.add_argument("--nodes", type=int, default=1, help="nodes per cell (slurm; >1: multi-node DDP)")
    group.add_argument("--cpus-per-cell", type=int, default=0, help="CPU cores per process")
    group.add_argument("--mem-gb", type=float, default=0.0, help="memory per node in GB")
    group.add_argument("--max-running", type=int, default=0, help="slurm: array tasks running at once (default: all)")
    group.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra #SBATCH parameter, e.g. qos=high or constraint=a100 (repeatable)",
    )


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
