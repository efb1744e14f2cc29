"""What Slurm says about the sweep's jobs, with or without accounting.

``squeue`` answers for every job Slurm still holds (queued, running, requeued
and waiting for its begin time, completing) whether or not the cluster keeps
accounting, and gives the reason a job pends. ``sacct`` is asked only about
jobs that left the queue, and only answers where accounting (slurmdbd) is on;
elsewhere a job that left the queue is simply ``gone`` and the run directory's
records tell how it ended. (submitit asks ``sacct`` alone: without accounting
it reports every job ``UNKNOWN``.)
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from clipstudy.engine.config import ConfigError

# Slurm states of a job that will still run or is running: its cell must not be submitted again.
ACTIVE = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)

# What a pending reason means for the user, where the reason alone does not say what to do.
REASON_HINTS = {
    "PartitionTimeLimit": "--time is above the partition's time limit (`sinfo -o '%P %l'`): it never starts; "
    "scancel it and resubmit with a lower --time",
    "BeginTime": "requeued: Slurm holds a requeued job about 2 minutes before it starts again",
    "JobHeldUser": "held: `scontrol release JOBID` lets it start",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it asks for are down or reserved",
    "PartitionDown": "its partition is down",
    "InvalidAccount": "the account is not valid: scancel it and resubmit with another --account",
    "InvalidQOS": "the QOS is not valid: scancel it and resubmit with another --sbatch qos=...",
}


@dataclass(frozen=True)
class JobState:
    """One job's state: ``state`` is Slurm's (PENDING, RUNNING, COMPLETED...), empty when Slurm no longer knows
    the job (it left the queue and there is no accounting to ask); ``reason`` is why a pending job waits."""

    state: str = ""
    reason: str = ""
    source: str = ""  # "squeue" or "sacct"; "" when neither knows the job

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self) -> str:
        """``PENDING (BeginTime)``, ``RUNNING``, ``COMPLETED``, or ``gone`` (left the queue, no accounting)."""
        if not self.state:
            return "gone"
        if self.reason and self.reason != "None" and self.state == "PENDING":
            return f"{self.state} ({self.reason})"
        return self.state

    def hint(self) -> str:
        """What the pending reason means for the user (empty when the reason says it all)."""
        return REASON_HINTS.get(self.reason, "") if self.state == "PENDING" else ""


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError(f"{command[0]} not found: --executor slurm needs the Slurm commands on PATH") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{command[0]} did not answer in 60 s: is slurmctld reachable (`scontrol ping`)?") from None


def expand_ids(job_id: str) -> list[str]:
    """``21_[0-2,5]`` -> ``21_0 21_1 21_2 21_5`` (how sacct and squeue name unstarted array tasks); other ids as is."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)\](?:%\d+)?", job_id)
    if not match:
        return [job_id]
    found = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        found += [f"{match.group(1)}_{k}" for k in range(int(low), int(high or low) + 1)]
    return found


def _parse(text: str, fields: int) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != fields or not parts[0]:
            continue  # a header, a step (21_0.batch) or anything else that is not one job
        for job_id in expand_ids(parts[0]):
            out[job_id] = parts[1:]
    return out


def from_squeue(job_ids: list[str]) -> dict[str, JobState]:
    """The jobs Slurm still holds, by job id (array tasks one by one)."""
    bases = sorted({job_id.split("_")[0] for job_id in job_ids})
    result = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)])
    if result.returncode:
        if "Invalid job id" in result.stderr:  # none of them is in the queue any more
            return {}
        raise ConfigError(
            f"squeue failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}; "
            "is slurmctld reachable (`scontrol ping`)?"
        )
    found = _parse(result.stdout, 3)
    return {job_id: JobState(state.split()[0], reason, "squeue") for job_id, (state, reason) in found.items()}


def from_sacct(job_ids: list[str]) -> dict[str, JobState]:
    """How the jobs that left the queue ended, where accounting is on; {} without accounting."""
    bases = sorted({job_id.split("_")[0] for job_id in job_ids})
    result = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(bases)])
    if result.returncode:  # e.g. "Slurm accounting storage is disabled"
        return {}
    return {job_id: JobState(state.split()[0], "", "sacct") for job_id, (state,) in _parse(result.stdout, 2).items()}


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """Each job's state: squeue's while Slurm holds it, then sacct's (accounting), else ``JobState()`` (gone)."""
    job_ids = [j for j in dict.fromkeys(job_ids) if j]
    if not job_ids:
        return {}
    states = from_squeue(job_ids)
    left = [job_id for job_id in job_ids if job_id not in states]
    if left:
        finished = from_sacct(left)
        states.update({job_id: finished[job_id] for job_id in left if job_id in finished})
    return {job_id: states.get(job_id, JobState()) for job_id in job_ids}
