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
import random
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
        [  # the in-process tests of the fingerprint (not the training runs and sweeps of the same file)
            f"tests/test_fingerprint.py::{name}"
            for name in (
                "test_fingerprint_holds_what_changes_results_and_nothing_else",
                "test_a_sweep_pass_lists_the_zero_shot_folder_once_and_later_passes_see_changes",
                "test_fingerprint_sees_regenerated_data_under_the_same_path",
                "test_a_run_on_other_data_is_refused_naming_it",
                "test_file_digest_is_the_sha256_of_the_files_bytes",
                "test_folder_digest_lists_relative_paths_and_with_contents_the_bytes_too",
                "test_listings_are_cached_for_one_pass_and_a_nested_pass_shares_it",
                "test_demo_manifest_is_the_generators_identity_or_none",
                "test_the_data_part_digests_each_file_the_run_reads",
                "test_each_data_input_changes_the_fingerprint_and_is_named",
                "test_a_regenerated_data_set_is_named_by_its_manifest",
                "test_every_configuration_field_is_either_an_input_or_neutral",
                "test_each_configuration_field_changes_the_fingerprint_and_is_named",
                "test_where_and_how_fast_a_run_executes_leaves_the_fingerprint_alone",
                "test_the_fingerprint_is_the_digest_of_the_resolved_configuration_and_the_data",
                "test_digest_of_hashes_canonical_json",
                "test_flatten_names_nested_entries_by_their_path",
                "test_differences_show_values_briefly",
                "test_describe_change_says_what_changed_in_a_few_words",
            )
        ],
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
        [  # all of test_pretrain.py but the four tests of tower training itself (about 35 s of its 55 s)
            f"tests/test_pretrain.py::{name}"
            for name in (
                "test_zeroshot_classes_never_reach_pretraining",
                "test_the_disjointness_check_fails_on_a_planted_overlap",
                "test_pretraining_captions_are_disjoint_from_the_study_captions",
                "test_cache_is_reused_keyed_by_content_and_leaves_the_run_rng_alone",
                "test_concurrent_runs_build_once",
                "test_runs_load_the_towers_and_scratch_does_not",
                "test_bad_settings_and_foreign_data_fail_clearly",
                "test_ctrl_c_while_pretraining_says_it_starts_again_from_step_0",
                "test_settings_come_from_the_pretrain_field_coerced_to_each_settings_type",
                "test_zeroshot_scenes_are_the_test_then_the_validation_scenes",
                "test_the_disjointness_check_counts_shared_classes_and_refuses_any",
                "test_study_captions_are_every_caption_and_prompt_as_the_study_cleans_them",
                "test_scene_labels_are_the_index_of_each_attribute",
                "test_the_cache_key_is_the_digest_of_its_documented_inputs",
                "test_each_tower_shape_is_part_of_the_cache_key",
                "test_each_pretraining_setting_is_part_of_the_cache_key",
                "test_the_data_digest_and_both_versions_are_part_of_the_cache_key",
                "test_the_data_digest_is_the_manifests_or_a_clear_refusal",
                "test_a_cache_entry_is_valid_only_when_the_towers_match_the_recorded_digest",
                "test_only_the_demo_towers_of_a_pretrained_run_take_the_demo_weights",
            )
        ],
    ),
    "statistics": (
        ["clipstudy/study/stats.py"],
        ["clipstudy.study.stats.*"],
        ["tests/test_stats.py"],
    ),
    "verdicts": (
        ["clipstudy/study/verdicts.py", "clipstudy/study/conclusions.py"],
        ["clipstudy.study.verdicts.*", "clipstudy.study.conclusions.*"],
        [  # constructed results tables (no files, no notebook); the report's own conclusion tests on run folders
            "tests/test_verdicts.py",
            "tests/test_report.py::test_tables_and_conclusions",
            "tests/test_report.py::test_conclusions_against_chance",
            "tests/test_report.py::test_conclusions_compare_variants_with_their_base_optimizer",
        ],
    ),
    "findings": (
        ["clipstudy/study/findings.py"],
        ["clipstudy.study.findings.*"],
        [
            "tests/test_findings.py",
            "tests/test_report.py::test_spearman_against_published",
            "tests/test_report.py::test_spearman_per_optimizer_row_against_a_hand_computation",
            "tests/test_report.py::test_paper_findings_hold_on_the_published_numbers_and_fail_when_broken",
        ],
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
        [
            "tests/test_executors.py::test_threads_come_from_the_allocation",
            "tests/test_executors.py::test_a_signal_after_training_ended_requeues_nothing",
            "tests/test_executors.py::test_the_not_requeued_error_of_a_finished_cell_returns_its_result",
            "tests/test_executors.py::test_distributed_rank_outside_a_job_reads_rank_or_zero",
            "tests/test_executors.py::test_distributed_rank_exports_torch_distributed_only_for_several_tasks",
            "tests/test_executors.py::test_cell_task_runs_the_notebook_on_rank_0_and_trains_directly_elsewhere",
            "tests/test_executors.py::test_not_requeued_error_on_another_rank_is_raised_even_when_the_cell_finished",
            "tests/test_executors.py::test_checkpoint_stops_training_and_requeues_the_same_task",
            "tests/test_executors.py::test_checkpoint_after_training_ended_requeues_nothing_and_signals_nothing",
            "tests/test_executors.py::test_allocation_threads_from_constructed_slurm_environments",
            "tests/test_executors.py::test_allocation_threads_reads_the_process_environment_by_default",
            "tests/test_executors.py::test_cell_threads_share_this_machine_among_the_cells",
            "tests/test_executors.py::test_saved_since_names_the_newest_checkpoint_only_if_written_since",
            "tests/test_executors.py::test_make_executor_passes_the_resources_to_submitit",
        ],
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
        [
            "tests/test_prepare_data.py::test_cc3m_counts_skips_and_check_data",
            "tests/test_prepare_data.py::test_cc3m_limit_is_deterministic_and_layout_independent",
            "tests/test_prepare_data.py::test_cc3m_max_side_resizes_keeping_aspect",
            "tests/test_prepare_data.py::test_cc3m_rerun_skips_unchanged_and_repairs_by_content",
            "tests/test_prepare_data.py::test_cc3m_rerun_removes_the_image_of_a_sample_gone_from_the_download",
            "tests/test_prepare_data.py::test_cc3m_errors_name_the_folder",
            "tests/test_prepare_data.py::test_coco_karpathy_writes_test_and_val_with_captions_in_order",
            "tests/test_prepare_data.py::test_imagenet_val_class_folders_follow_clipstudy_order",
            "tests/test_prepare_data.py::test_imagenet_val_relabel_moves_links_and_bad_labels_fail",
            "tests/test_prepare_data.py::test_imagenet_train_slice_is_class_balanced_seeded_and_counted",
            "tests/test_prepare_data.py::test_prepared_counts_every_skip_and_keeps_the_first_three_names",
            "tests/test_prepare_data.py::test_progress_bar_goes_to_stderr_unless_progress_is_false",
            "tests/test_prepare_data.py::test_write_text_if_changed_writes_only_a_difference",
            "tests/test_prepare_data.py::test_write_json_if_changed_writes_indented_unescaped_json_with_a_final_newline",
            "tests/test_prepare_data.py::test_ensure_link_makes_repairs_and_refuses",
            "tests/test_prepare_data.py::test_require_path_and_read_json_name_the_file_and_the_fix",
            "tests/test_prepare_data.py::test_coco_karpathy_counts_each_skip_per_split",
            "tests/test_prepare_data.py::test_coco_karpathy_refuses_what_it_cannot_use",
            "tests/test_prepare_data.py::test_loc_val_solution_reads_the_first_wnid_and_checks_its_columns",
            "tests/test_prepare_data.py::test_devkit_labels_name_the_bad_line_and_the_missing_meta",
            "tests/test_prepare_data.py::test_imagenet_val_counts_each_skip",
            "tests/test_prepare_data.py::test_imagenet_val_takes_meta_from_anywhere_and_refuses_unusable_folders",
            "tests/test_prepare_data.py::test_imagenet_train_slice_counts_each_skip_with_its_defaults",
            "tests/test_prepare_data.py::test_imagenet_train_slice_refuses_what_it_cannot_use",
            "tests/test_prepare_data.py::test_cc3m_counts_every_skip_and_records_its_state",
            "tests/test_prepare_data.py::test_stats_failures_sum_every_readable_stats_file",
            "tests/test_prepare_data.py::test_cc3m_without_stats_files_reports_no_failed_downloads",
            "tests/test_prepare_data.py::test_cc3m_reads_in_chunks_in_shard_order_and_stops_at_the_limit",
            "tests/test_prepare_data.py::test_cc3m_keeps_shard_order_without_a_limit_whatever_the_rank",
            "tests/test_prepare_data.py::test_cc3m_max_side_reencodes_what_it_must_and_keeps_what_it_may",
            "tests/test_prepare_data.py::test_cc3m_state_without_outputs_and_a_smaller_limit",
            "tests/test_prepare_data.py::test_cc3m_defaults_take_every_sample_in_full_size",
            "tests/test_prepare_data.py::test_cc3m_refuses_what_it_cannot_use",
        ],
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
        [
            "tests/test_tune.py::test_the_grid_is_the_half_decade_lattice_with_both_ends",
            "tests/test_tune.py::test_extend_steps_past_the_end_where_the_best_is",
            "tests/test_tune.py::test_scores_average_over_trials_and_a_broken_trial_disqualifies_its_rate",
            "tests/test_tune.py::test_the_shared_rate_is_the_best_mean_among_rates_every_optimizer_tried",
            "tests/test_tune.py::test_tune_extends_each_grid_until_its_best_is_bracketed_with_equal_base_budgets",
            "tests/test_tune.py::test_tuning_seeds_stay_apart_from_reporting_seeds",
            "tests/test_tune.py::test_rates_from_reads_the_choices_and_refuses_other_files",
            "tests/test_tune.py::test_with_a_rate_per_loss_the_shared_rate_is_chosen_with_clip",
            "tests/test_tune.py::test_sweep_takes_a_tuning_tables_rates_most_specific_first",
            "tests/test_tune.py::test_lattice_rates_and_indices_worked_by_hand",
            "tests/test_tune.py::test_extend_reaches_the_limits_but_never_passes_them",
            "tests/test_tune.py::test_groups_are_optimizers_or_optimizer_and_loss",
            "tests/test_tune.py::test_group_scores_are_means_with_a_completed_trial_without_score_disqualifying",
            "tests/test_tune.py::test_best_settings_break_ties_by_the_smaller_rate_then_the_smaller_decay",
            "tests/test_tune.py::test_shared_rate_uses_each_optimizers_best_decay_breaks_ties_low_and_ignores_others",
            "tests/test_tune.py::test_plan_trials_makes_one_cell_per_rate_decay_loss_and_seed",
            "tests/test_tune.py::test_trial_table_has_a_row_per_planned_trial_missing_ones_marked",
            "tests/test_tune.py::test_write_table_writes_six_significant_digits_and_no_index",
            "tests/test_tune.py::test_rates_from_refuses_with_the_reason",
        ],
    ),
}
STATUS = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")


def scratch_copy(dest: Path, source_files: list[str], tests: list[str]) -> None:
    copy_worktree(dest, skip=("reports/",))
    select(dest, source_files, tests)


def select(dest: Path, source_files: list[str], tests: list[str]) -> None:
    """The checkout's pyproject.toml into ``dest`` with the module's files to mutate and its test selection."""
    shutil.copyfile(ROOT / "pyproject.toml", dest / "pyproject.toml")
    selection = ", ".join(f'"{t}"' for t in tests)
    mutate = ", ".join(f'"{f}"' for f in source_files)
    keys = f"only_mutate = [{mutate}]\npytest_add_cli_args_test_selection = [{selection}]\n"
    # into the [tool.mutmut] table itself: appended at the end of the file they would belong to whatever
    # table comes last (an import-linter contract), and mutmut would mutate everything and run every test
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    if "[tool.mutmut]\n" not in text:
        sys.exit(f"{pyproject}: no [tool.mutmut] table to add the module's selection to")
    pyproject.write_text(text.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + keys, 1))


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
    return {
        "counts": counts,
        "survivors": sorted(n for n, s in statuses.items() if s not in ("killed", "not checked")),
        "names": sorted(statuses),
    }


def sample_of(folder: Path, globs: list[str], size: int, seed: int) -> list[str]:
    """``size`` of the module's mutant names drawn at random (``seed``): mutmut first makes every mutant (a run
    of a name that matches none checks nothing), then the sample is drawn from their names."""
    mutmut_run(folder, 1, ["clipstudy.no_such_function__mutmut_1"])
    names = score(folder, globs)["names"]
    return sorted(random.Random(seed).sample(names, min(size, len(names))))


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
    source_files, globs, tests = MODULES[module]
    if not (folder / "mutants").is_dir():
        sys.exit(f"--recheck {folder}: no mutants/ there; pass a folder kept by --keep for --module {module!r}")
    result = score(folder, globs)
    if not result["survivors"]:  # `mutmut run` without names would run every mutant again
        return f"{summary(module, result['counts'])}  nothing to recheck", []
    names = result["survivors"]
    for where in (folder / "tests", folder / "mutants" / "tests"):
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(ROOT / "tests", where, ignore=shutil.ignore_patterns("__pycache__"))
    select(folder, source_files, tests)  # the selection as it is now: new tests named in MODULES run too
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
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="check N mutants drawn at random per module (an estimate; the rest are reported as not checked)",
    )
    parser.add_argument("--sample-seed", type=int, default=0, help="the draw of --sample (default 0)")
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
        names = sample_of(folder, globs, args.sample, args.sample_seed) if args.sample else globs
        run = mutmut_run(folder, args.max_children, names)
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
