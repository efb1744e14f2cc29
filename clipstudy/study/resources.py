"""What one cell asks of the machine or cluster (:class:`Resources`), and the sweep's options that say it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from clipstudy.engine.config import ConfigError
from clipstudy.study.cells import parse_mapping

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
