"""The reproducibility benchmark's comparisons, on constructed runs (the benchmark itself trains for minutes)."""

import importlib
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("bench_repro")


def _run(losses, scores=None, grad=None):
    history = [
        {"step": float(i + 1), "loss": loss, "grad_norm": (grad or {}).get(i + 1, 1.0)} for i, loss in enumerate(losses)
    ]
    base_scores = dict.fromkeys(_module().SCORES, 50.0)
    return {"history": history, "scores": {**base_scores, **(scores or {})}, "final_loss": losses[-1]}


def test_first_difference_finds_the_first_step_and_column():
    bench = _module()
    ref = _run([3.0, 2.0, 1.0])
    assert bench.first_difference(ref["history"], ref["history"]) == (None, None)
    other = _run([3.0, 2.0, 1.5], grad={2: 1.25})
    assert bench.first_difference(other["history"], ref["history"]) == (2, "grad_norm")
    assert bench.first_difference(other["history"], ref["history"], ["loss"]) == (3, "loss")
    nan = _run([float("nan")])
    assert bench.first_difference(nan["history"], nan["history"]) == (None, None)  # NaN equals NaN here
    assert bench.first_difference(ref["history"][:2], ref["history"]) == (3, "length")


def test_compare_and_divergence_stage():
    bench = _module()
    ref = _run([3.0, 2.0, 1.0])
    same = bench.compare(ref, ref)
    assert same["final_loss_diff"] == 0.0 and same["max_score_diff"] == 0.0
    assert bench.divergence_stage(same) == "identical"

    other = bench.compare(_run([3.0, 2.0, 1.25], scores={"average": 48.0, "val_average": 50.5}), ref)
    assert other["first_loss_diff_step"] == 3 and other["final_loss_diff"] == 0.25
    assert other["average_diff"] == 2.0 and other["val_average_diff"] == 0.5 and other["max_score_diff"] == 2.0
    assert bench.divergence_stage(other) == "training step 3 (loss)"

    eval_only = bench.compare(_run([3.0, 2.0, 1.0], scores={"txt_r1": 50.2}), ref)
    assert eval_only["first_any_diff_step"] is None and math.isclose(eval_only["max_score_diff"], 0.2)
    assert bench.divergence_stage(eval_only) == "evaluation only"
    assert bench.divergence_stage({**same, "towers_same": False}) == "towers; identical from the same towers"


def test_outcome_key_sees_history_and_scores():
    bench = _module()
    ref = _run([3.0, 2.0])
    assert bench.outcome_key(ref) == bench.outcome_key(_run([3.0, 2.0]))
    assert bench.outcome_key(ref) != bench.outcome_key(_run([3.0, 2.0000001]))
    assert bench.outcome_key(ref) != bench.outcome_key(_run([3.0, 2.0], scores={"zeroshot_top1": 49.0}))


def test_settings_baseline_first_and_pins_with_their_variants():
    bench = _module()
    rows = bench.settings()
    assert rows[0].name == "machine default" and rows[0].describe() == "(nothing set)"
    names = [s.name for s in rows]
    for name in ("aten default", "aten avx2", "aten avx512", "mkl COMPATIBLE", "conservative", "avx2 machine"):
        assert name in names
    assert "aten avx512" not in [s.name for s in bench.settings(avx512=False)]
    conservative = next(s for s in rows if s.name == "conservative")
    assert not conservative.mkldnn and conservative.threads == 1
    assert conservative.env == {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    # the pin wins over the simulated machine's dispatch: same variable, the pin's value
    on_avx2 = next(s for s in rows if s.name == "conservative + avx2 machine")
    assert on_avx2.env["ATEN_CPU_CAPABILITY"] == "default" and on_avx2.env["DNNL_MAX_CPU_ISA"] == "AVX2"
    assert set(s.name for s in bench.settings(quick=True)) < set(names)
    for s in rows:
        assert set(s.env) <= set(bench.CONTROLLED)
        argv = bench.train_argv(Path("d"), Path("o"), s, "clip", "adamw", 60, 0)
        assert argv[argv.index("--threads") + 1] == str(s.threads)
        assert argv[argv.index("--deterministic") + 1] == str(s.deterministic).lower()


def test_verdict_requires_identical_variants_and_the_cost_goal():
    bench = _module()

    def row(name, outcome, train_ratio=1.0, towers="t"):
        return {
            "setting": name,
            "outcome": outcome,
            "repeatable": True,
            "towers_sha256": towers,
            "final_loss_diff": 0.0 if outcome == "A" else 1e-3,
            "val_average_diff": 0.0 if outcome == "A" else 1.5,
            "average_diff": 0.0 if outcome == "A" else 2.0,
            "max_score_diff": 0.0 if outcome == "A" else 2.5,
            "divergence": "identical" if outcome == "A" else "training step 2 (loss)",
            "wall_ratio": train_ratio,
            "train_ratio": train_ratio,
        }

    rows = [
        row("machine default", "A"),
        row("aten avx2", "B"),
        row("conservative", "C", 1.4, "u"),
        row("conservative + avx2 machine", "C", 1.4, "u"),
        row("pinned avx2", "D", 1.1),
        row("pinned avx2 + avx2 machine", "E", 1.1),
    ]
    v = bench.verdict(rows)
    assert v["unpinned_spread"]["max_average_diff"] == 2.0
    assert v["unpinned_spread"]["settings_changing_numbers"] == ["aten avx2"]
    assert v["pins"]["conservative"]["identical_across_variants"] and v["pins"]["conservative"]["within_cost_goal"]
    assert not v["pins"]["pinned avx2"]["identical_across_variants"]
    rows[3]["towers_sha256"] = "other"  # same training, other towers: not identical
    assert not bench.verdict(rows)["pins"]["conservative"]["identical_across_variants"]
