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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipstudy.engine import records
from clipstudy.engine.config import ConfigError
from clipstudy.fileio import LOCK_NAME, is_locked
from clipstudy.study.cells import Cell, cell_state, parse_mapping, record_state, run_cell, run_config, summary_line
from clipstudy.study.jobs import active_slurm_job, read_job, record_job, scheduler_states, wait_for_jobs

EXECUTORS = ("inline", "local", "slurm")
DEFAULT_MAX_REQUEUES = 20


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
    max_requeues: int = DEFAULT_MAX_REQUEUES  # time limits a cell may run into and still be requeued

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
        max_requeues=args.max_requeues,
    )
    for name in ("gpus_per_node", "procs_per_node", "cpus_per_task", "mem_gb"):
        if getattr(res, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0")
    if res.max_requeues < 0:
        raise ConfigError(f"--max-requeues {res.max_requeues}: must be >= 0")
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
    group.add_argument(
        "--wait", action="store_true", help="slurm: wait until the cells' jobs leave the queue and print each result"
    )
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
        "--max-requeues",
        type=int,
        default=DEFAULT_MAX_REQUEUES,
        help="time limits a cell may run into and still be requeued from its checkpoint (submitit's "
        f"max_num_timeout; preemptions do not count; default {DEFAULT_MAX_REQUEUES})",
    )
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
