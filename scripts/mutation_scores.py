"""Mutation score of the modules that carry the study's promises (``make mutation``).

For each module, mutmut mutates the functions that hold a promise (checkpoints and resume, the losses,
the retrieval and zero-shot metrics, the sweep's cell state) and runs the tests that hold them to it. Each
module runs in its own scratch copy of the working tree, so each gets its own test selection: in-process
tests only (a mutant lives in the test process) and no notebook kernels, which keeps a module to minutes
on two cores. Prints killed / total per module; ``--module`` picks some, ``--keep`` keeps the copies (to
inspect survivors with ``mutmut show NAME`` there). ``--recheck FOLDER`` takes a kept copy, brings in the
current tests and runs again only the mutants they had not killed (the mutated code is the same, and a
test suite that only grew still kills what it killed), then prints the module's score.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from mutation_resume import copy_worktree  # noqa: E402  (the same tree copy as the resume check)

# module -> (file, mutant-name globs of the promise-carrying functions, tests)
MODULES = {
    "checkpoint": (  # checkpoints, and the atomic writes and locks they stand on (moved to fileio)
        ["clipstudy/engine/checkpoint.py", "clipstudy/fileio.py"],
        ["clipstudy.engine.checkpoint.*", "clipstudy.fileio.*"],
        [
            "tests/test_checkpoint.py",
            "tests/test_sweep.py::test_dry_run_lists_each_cells_state_and_runs_nothing",
            "tests/test_sweep.py::test_a_cell_locked_by_another_sweep_is_skipped_not_trained",
        ],
    ),
    "runstate": (
        ["clipstudy/engine/runstate.py"],
        ["clipstudy.engine.runstate.*"],
        [
            "tests/test_runstate.py",
            "tests/test_resume.py::test_stop_request_flags_the_first_signal_raises_on_the_second_and_restores_handlers",
            "tests/test_resume.py::test_sigterm_then_rerun_resumes_and_equals_uninterrupted[sogclr-mid-epoch]",
            "tests/test_resume.py::test_sigterm_then_rerun_resumes_and_equals_uninterrupted[siglip-mid-epoch]",
        ],
    ),
    "losses": (
        ["clipstudy/core/losses.py", "clipstudy/core/losses_base.py", "clipstudy/core/losses_global.py"],
        ["clipstudy.core.losses.*", "clipstudy.core.losses_base.*", "clipstudy.core.losses_global.*"],
        ["tests/test_losses.py"],
    ),
    "retrieval metrics": (
        ["clipstudy/core/metrics.py"],
        [
            f"clipstudy.core.metrics.x_{name}__mutmut_*"
            for name in (
                "_as_index_tensor",
                "_rows_per_chunk",
                "_recalls",
                "retrieval_ranks",
                "retrieval_metrics",
                "_no_correct_in_top",
                "chance_levels",
                "zeroshot_metrics",
            )
        ],
        ["tests/test_evaluate.py"],
    ),
    "sweep cell state": (
        ["clipstudy/study/cells.py"],
        ["clipstudy.study.cells.x_cell_state__mutmut_*", "clipstudy.study.cells.x_record_state__mutmut_*"],
        [
            "tests/test_sweep.py::test_dry_run_lists_each_cells_state_and_runs_nothing",
            "tests/test_sweep.py::test_record_state_tells_stale_and_cut_runs_apart_and_needs_a_config_for_either",
            "tests/test_sweep.py::test_a_cell_locked_by_another_sweep_is_skipped_not_trained",
        ],
    ),
    # --- each entry below: its owner edits only its own test list
    "config validation": (
        ["clipstudy/engine/config.py"],
        [
            f"clipstudy.engine.config.x_{name}__mutmut_*"
            for name in ("validate", "_coerce", "_coerce_bool", "make_config", "_absolute_path", "config_from_dict")
        ],
        ["tests/test_config.py"],
    ),
    "fingerprint": (
        ["clipstudy/engine/fingerprint.py"],
        ["clipstudy.engine.fingerprint.*"],
        ["tests/test_fingerprint.py"],
    ),
    "pretrain": (
        ["clipstudy/engine/pretrain.py"],
        [
            f"clipstudy.engine.pretrain.x_{name}__mutmut_*"
            for name in (
                "settings_from",
                "zeroshot_scenes",
                "check_disjoint",
                "study_captions",
                "scene_labels",
                "cache_key",
                "_data_digest",
                "_valid",
                "uses_pretrained_towers",
            )
        ],
        ["tests/test_pretrain.py"],
    ),
    "statistics": (
        ["clipstudy/study/stats.py"],
        ["clipstudy.study.stats.*"],
        ["tests/test_stats.py"],
    ),
    "verdicts": (
        ["clipstudy/study/verdicts.py", "clipstudy/study/conclusions.py"],
        ["clipstudy.study.verdicts.*", "clipstudy.study.conclusions.*"],
        ["tests/test_verdicts.py", "tests/test_report.py"],
    ),
    "findings": (
        ["clipstudy/study/findings.py"],
        ["clipstudy.study.findings.*"],
        ["tests/test_report.py", "tests/test_verdicts.py"],
    ),
    "diagnostics": (
        ["clipstudy/core/diagnostics.py"],
        ["clipstudy.core.diagnostics.*"],
        ["tests/test_diagnostics.py"],
    ),
    "executors": (
        ["clipstudy/study/executors.py"],
        [
            f"clipstudy.study.executors.{name}__mutmut_*"
            for name in (
                "x_distributed_rank",
                "xǁCellTaskǁ__call__",
                "xǁCellTaskǁcheckpoint",
                "x_allocation_threads",
                "x_cell_threads",
                "x_saved_since",
                "x_make_executor",
            )
        ],
        ["tests/test_executors.py"],
    ),
    "prepare converters": (
        [
            "clipstudy/data/prepare/cc3m.py",
            "clipstudy/data/prepare/coco.py",
            "clipstudy/data/prepare/imagenet.py",
            "clipstudy/data/prepare/common.py",
        ],
        [
            "clipstudy.data.prepare.cc3m.*",
            "clipstudy.data.prepare.coco.*",
            "clipstudy.data.prepare.imagenet.*",
            "clipstudy.data.prepare.common.*",
        ],
        ["tests/test_prepare_data.py"],
    ),
    "tuning": (
        ["clipstudy/study/tune.py", "clipstudy/study/tuning_table.py"],
        [
            *(
                f"clipstudy.study.tune.x_{name}__mutmut_*"
                for name in (
                    "lattice",
                    "lattice_index",
                    "lr_grid",
                    "extend",
                    "group_of",
                    "group_scores",
                    "best_settings",
                    "shared_rate",
                    "plan_trials",
                    "trial_table",
                )
            ),
            "clipstudy.study.tuning_table.*",
        ],
        ["tests/test_tune.py"],
    ),
}
STATUS = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")


def scratch_copy(dest: Path, source_files: list[str], tests: list[str]) -> None:
    copy_worktree(dest, skip=("reports/",))
    selection = ", ".join(f'"{t}"' for t in tests)
    with open(dest / "pyproject.toml", "a") as fh:
        mutate = ", ".join(f'"{f}"' for f in source_files)
        fh.write(f"only_mutate = [{mutate}]\npytest_add_cli_args_test_selection = [{selection}]\n")


def score(folder: Path, globs: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder, capture_output=True, text=True
    ).stdout
    from fnmatch import fnmatch

    statuses = {}
    for line in out.splitlines():
        found = STATUS.match(line)
        if found and any(fnmatch(found.group(1), g) for g in globs):
            statuses[found.group(1)] = found.group(2).strip()
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    return {"counts": counts, "survivors": sorted(n for n, s in statuses.items() if s not in ("killed", "not checked"))}


def summary(module: str, counts: dict) -> str:
    """``killed / checked`` (timeouts and survivors count as not killed), and what was left unchecked."""
    checked = sum(n for status, n in counts.items() if status != "not checked")
    killed = counts.get("killed", 0)
    unchecked = counts.get("not checked", 0)
    return (
        f"{module:18} {killed:4d} / {checked:4d} killed ({100 * killed / max(checked, 1):5.1f}%)"
        + (f", {unchecked} not checked" if unchecked else "")
        + f"  {counts}"
    )


def mutmut_run(folder: Path, max_children: int, names: list[str]) -> subprocess.CompletedProcess:
    """``mutmut run NAMES`` in a scratch copy (without our PYTHONPATH: mutmut sets the path itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *names],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )


def recheck(folder: Path, module: str, max_children: int) -> tuple[str, list[str]]:
    """Copy the current tests into a kept copy and rerun its mutants that were not killed; (summary, survivors)."""
    _, globs, _ = MODULES[module]
    if not (folder / "mutants").is_dir():
        sys.exit(f"--recheck {folder}: no mutants/ there; pass a folder kept by --keep for --module {module!r}")
    result = score(folder, globs)
    if not result["survivors"]:  # `mutmut run` without names would run every mutant again
        return f"{summary(module, result['counts'])}  nothing to recheck", []
    names = result["survivors"]
    for where in (folder / "tests", folder / "mutants" / "tests"):
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(ROOT / "tests", where, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # new tests: find which reach what
    started = time.time()
    run = mutmut_run(folder, max_children, names)
    result = score(folder, globs)
    line = f"{summary(module, result['counts'])}  recheck of {len(names)}: {time.time() - started:.0f}s"
    if run.returncode != 0:
        line += f"\n    mutmut exited {run.returncode}: {run.stdout[-400:]}{run.stderr[-400:]}"
    return line, result["survivors"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", choices=sorted(MODULES), action="append")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (paths printed)")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--recheck", type=Path, metavar="FOLDER", help="a kept copy of --module to recheck")
    args = parser.parse_args(argv)
    if args.recheck:
        if not args.module or len(args.module) != 1:
            parser.error("--recheck FOLDER needs the one --module it was made for")
        line, survivors = recheck(args.recheck, args.module[0], args.max_children)
        print(line, flush=True)
        for name in survivors:
            print(f"    {name}", flush=True)
        return 0
    rows = []
    for module in args.module or MODULES:
        source_files, globs, tests = MODULES[module]
        folder = Path(tempfile.mkdtemp(prefix=f"clipstudy-mutation-{module.replace(' ', '-')}-"))
        scratch_copy(folder, source_files, tests)
        started = time.time()
        run = mutmut_run(folder, args.max_children, globs)
        result = score(folder, globs)
        line = f"{summary(module, result['counts'])}  {time.time() - started:.0f}s"
        print(line, flush=True)
        for name in result["survivors"]:
            print(f"    {name}", flush=True)
        if run.returncode != 0:
            print(f"    mutmut exited {run.returncode}: {run.stdout[-400:]}{run.stderr[-400:]}", flush=True)
        if args.keep:
            print(f"    kept in {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        rows.append(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
