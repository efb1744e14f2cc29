"""The jobs of submitted cells: each cell's ``job.json``, its job's state, ``sweep --status`` and ``sweep --wait``.

A cell's state combines its run directory (:func:`clipstudy.study.cells.cell_state`)
with its job: while Slurm still holds the job (queued, running, or requeued after
a preemption, a time limit or ``scontrol requeue``) the cell is ``queued``,
``requeued`` or ``running``, never ``failed``, whatever an earlier attempt left on
disk. Once the job has left the queue, the run directory tells how it ended.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from clipstudy.engine import records
from clipstudy.engine.config import ConfigError
from clipstudy.fileio import write_json
from clipstudy.study.cells import cell_state, summary_line
from clipstudy.study.slurm_state import JobState, job_states

JOB_RECORD = "job.json"


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
            "submitted_at": time.time(),
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


def scheduler_states(job_records: list[dict]) -> dict[str, JobState]:
    """Job id -> state for each recorded job: Slurm's (one squeue call for all), or whether a local job lives."""
    slurm = [r["job_id"] for r in job_records if r.get("executor") == "slurm"]
    states = job_states(slurm)
    for record in job_records:
        if record.get("executor") == "local":
            alive = Path(f"/proc/{record['job_id']}").exists()
            states[record["job_id"]] = JobState("RUNNING" if alive else "EXITED", "", "proc")
    return states


def active_slurm_job(record: dict, states: dict[str, JobState]) -> bool:
    """Whether the recorded job is a Slurm job still queued, running or requeued (its cell is not submitted again)."""
    return record.get("executor") == "slurm" and states.get(record["job_id"], JobState()).active


def _newest_write(out: Path) -> float:
    """When the run directory's records last changed: metrics.json or the newest checkpoint."""
    paths = [out / records.METRICS_FILE, *(out / "checkpoints").glob("ckpt-*.pt")]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def cell_view(cell, record: dict, job: JobState) -> tuple[str, str]:
    """(state, detail) of a cell with a job: the run directory's, unless the job is still held by Slurm."""
    state, detail = cell_state(cell.out, cell.config)
    if not job.active or state in ("done", "diverged", "stale"):
        return state, detail
    if job.state != "PENDING":
        return "running", detail if state == "running" else f"job {job.state.lower()}"
    ran = _newest_write(cell.out) >= record.get("submitted_at", float("inf")) or job.reason == "BeginTime"
    why = job.hint() or (f"waits for {job.reason}" if job.reason and job.reason != "None" else "")
    if ran:  # this job ran and was preempted, timed out or requeued: it resumes from its checkpoint
        return "requeued", "; ".join(x for x in (why, detail) if x)
    return "queued", why


def print_status(cells: list) -> None:
    """One line per cell: its state, its job (id and scheduler state, with the pending reason) and its log."""
    job_records = {cell.name: read_job(cell.out) for cell in cells}
    note = ""
    try:
        states = scheduler_states([r for r in job_records.values() if r])
    except ConfigError as err:
        states, note = {}, f"(job states unknown: {err})"
    print(f"{'cell':<28} {'state':<11} {'job':<12} {'job state':<28} {'log':<40} detail")
    for cell in cells:
        record = job_records[cell.name]
        job = states.get(record.get("job_id", ""), JobState())
        state, detail = cell_view(cell, record, job) if record else cell_state(cell.out, cell.config)
        log = str(cell.out / "job.out") if record else "-"
        shown = job.describe() if record and (states or not note) else "-"
        print(f"{cell.name:<28} {state:<11} {record.get('job_id', '-'):<12} {shown:<28} {log:<40} {detail}")
    if note:
        print(note)


def _result(record: dict):
    """(outcome, value) of the job's task 0 as submitit pickled it ("success" or "error"), or None."""
    from submitit.core.utils import JobPaths, pickle_load

    path = JobPaths(record["folder"], job_id=record["job_id"], task_id=0).result_pickle
    try:
        return pickle_load(path)
    except (OSError, EOFError, ValueError):
        return None


def job_outcome(cell, record: dict, job: JobState) -> dict:
    """How a cell whose job left the queue ended: its finished record, the job's own result, the interruption
    it recorded, or a failure naming the job's last state and log (never an older run's record)."""
    metrics = records.read_metrics(cell.out) or {}
    result = _result(record)
    if records.is_finished(metrics):  # the run's own result when it is the same end, else the record
        if result and result[0] == "success" and isinstance(result[1], dict):
            if result[1].get("status") == metrics["status"]:
                return result[1]
        return {**metrics, "sweep_wall_s": metrics.get("wall_time_s") or 0.0}
    fresh = bool(metrics) and (cell.out / records.METRICS_FILE).stat().st_mtime >= record.get("submitted_at", 0)
    if result and result[0] == "success" and isinstance(result[1], dict):
        return result[1]
    if fresh and metrics.get("status") in (records.INTERRUPTED, records.FAILED):
        return metrics
    if result:
        last = [line for line in str(result[1]).strip().splitlines() if line.strip()] or ["?"]
        return {"status": records.FAILED, "error": f"job {record['job_id']}: {last[-1].strip()}"}
    return {
        "status": records.FAILED,
        "error": f"job {record['job_id']} ended ({job.describe()}) without a result; see {cell.out / 'job.out'}",
    }


def wait_for_jobs(cells: list, *, poll_s: float = 5.0) -> dict[str, dict]:
    """Wait until every cell's recorded Slurm job has left the queue; print each cell's end (and each requeue,
    which is not an end); return cell name -> metrics."""
    remaining, results, shown, warned = {cell.name: cell for cell in cells}, {}, {}, False
    while remaining:
        job_records = {name: read_job(cell.out) for name, cell in remaining.items()}
        try:
            states = scheduler_states(list(job_records.values()))
        except ConfigError as err:  # slurmctld briefly unreachable: ask again
            if not warned:
                print(f"warning: {err}; retrying", flush=True)
            warned = True
            time.sleep(poll_s)
            continue
        for name, cell in list(remaining.items()):
            record = job_records[name]
            job = states.get(record.get("job_id", ""), JobState())
            if job.active:
                state, detail = cell_view(cell, record, job)
                if state == "requeued" and shown.get(name) != job.describe():
                    print(f"{name:<28} requeued (job {record['job_id']} {job.describe()}); waiting", flush=True)
                shown[name] = job.describe() if state == "requeued" else ""
                continue
            results[name] = job_outcome(cell, record, job)
            print(summary_line(cell, results[name]), flush=True)
            del remaining[name]
        if remaining:
            time.sleep(poll_s)
    return results
