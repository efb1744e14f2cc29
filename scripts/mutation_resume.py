"""Check that the resume tests fail when resume is broken (``make test-mutation-resume``).

Copies the working tree to a temporary folder, makes ``checkpoint.load_latest`` find nothing there (every
rerun then restarts from scratch, which a deterministic run cannot tell apart by its final numbers), and
runs the tests that promise a resume after ``kill -9``, after SIGTERM / SIGINT and after a full disk. Each
group must have at least one failing test; the script exits 1 if a group passes with resume broken.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {
    "kill -9": ["tests/test_resume.py::test_kill9_of_the_cli_then_rerun_resumes"],
    "SIGTERM / SIGINT": [
        "tests/test_resume.py::test_sigterm_then_rerun_resumes_and_equals_uninterrupted",
        "tests/test_resume.py::test_sigint_of_the_cli_checkpoints_exits_130_and_the_rerun_resumes",
    ],
    "full disk": ["tests/test_faults.py::test_full_disk_at_a_checkpoint_keeps_the_previous_one"],
}
LOAD_LATEST = re.compile(r"(def load_latest\(.*?\n    \"\"\".*?\"\"\"\n)", re.S)


def copy_worktree(dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the files git tracks or would track (not ignored ones), less the folders in ``skip``, to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file() and not name.startswith(skip):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def broken_copy(dest: Path) -> None:
    copy_worktree(dest)
    source = dest / "clipstudy" / "checkpoint.py"
    text, n = LOAD_LATEST.subn(r"\1    return None, None, []  # mutation: resume finds nothing\n", source.read_text())
    if n != 1:
        sys.exit(f"error: {source}: load_latest not found; update {Path(__file__).name}")
    source.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=sorted(GROUPS), action="append", help="only these groups")
    args = parser.parse_args(argv)
    survived = []
    with tempfile.TemporaryDirectory(prefix="clipstudy-mutant-") as tmp:
        broken_copy(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}  # the broken copy wins over the installed package
        for group in args.group or GROUPS:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", *GROUPS[group]],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
            verdict = "killed" if result.returncode == 1 else "SURVIVED" if result.returncode == 0 else "ERROR"
            print(f"{group:18} {verdict:8} {summary}")
            if verdict != "killed":
                survived.append(group)
    if survived:
        print(f"resume broken, yet these groups pass or error: {', '.join(survived)}", file=sys.stderr)
        return 1
    print("every group has a test that fails when resume is broken")
    return 0


if __name__ == "__main__":
    sys.exit(main())
