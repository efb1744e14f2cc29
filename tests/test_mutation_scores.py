"""scripts/mutation_scores.py (``make mutation``): each module's scratch copy tells mutmut what to mutate and
which tests to run, and every entry names files and tests that exist (the script runs outside ``make test``,
so a move would otherwise break it silently)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import mutation_scores  # noqa: E402


def test_the_selection_lands_in_the_mutmut_table(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(mutation_scores, "copy_worktree", lambda dest, skip=(): None)
    mutation_scores.scratch_copy(tmp_path, ["clipstudy/study/stats.py"], ["tests/test_stats.py::test_a"])
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert config["tool"]["mutmut"]["only_mutate"] == ["clipstudy/study/stats.py"]
    assert config["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == ["tests/test_stats.py::test_a"]
    # and nowhere else (appended at the end, they would land in the last import-linter contract)
    contracts = config["tool"]["importlinter"]["contracts"]
    assert not any("only_mutate" in contract for contract in contracts)


def test_a_recheck_runs_with_the_selection_as_it_is_now(tmp_path, monkeypatch):
    # a kept copy made before a test was added to MODULES: the recheck brings in the tests and names the new one
    (tmp_path / "mutants").mkdir()
    mutation_scores.select(tmp_path, ["clipstudy/study/stats.py"], ["tests/test_stats.py::test_old_only"])
    ran = []
    monkeypatch.setattr(mutation_scores, "score", lambda folder, globs: {"counts": {}, "survivors": ["m_1"]})
    monkeypatch.setattr(mutation_scores, "mutmut_run", lambda folder, children, names: ran.append(names) or _Done())
    mutation_scores.recheck(tmp_path, "statistics", 1)
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    source_files, _, tests = mutation_scores.MODULES["statistics"]
    assert config["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] == tests
    assert config["tool"]["mutmut"]["only_mutate"] == source_files
    assert ran == [["m_1"]] and (tmp_path / "mutants" / "tests" / "test_stats.py").is_file()


class _Done:
    returncode = 0


@pytest.mark.parametrize("module", sorted(mutation_scores.MODULES))
def test_every_entry_names_existing_files_and_tests(module):
    source_files, globs, tests = mutation_scores.MODULES[module]
    assert globs
    for source in source_files:
        assert (ROOT / source).is_file(), f"{module}: no {source}"
    for test in tests:
        file, _, name = test.partition("::")
        assert (ROOT / file).is_file(), f"{module}: no {file}"
        if name:
            assert f"def {name.split('[')[0]}(" in (ROOT / file).read_text(), f"{module}: no test {test}"
