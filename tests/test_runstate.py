"""Resume: checks before any write, the checkpoint format, the resume log, one precision policy."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from clipstudy import precision, records, runstate
from clipstudy.checkpoint import checkpoint_paths, save_checkpoint
from clipstudy.__main__ import main as clipstudy_main
from clipstudy.config import ConfigError, make_config
from clipstudy.train import train


def smoke(demo_data_dir, out, **kw):
    return make_config("smoke", data=str(demo_data_dir), out=str(out), threads=1, epochs=1, **kw)


def snapshot(folder: Path) -> dict:
    """Digest of every file under ``folder`` (the lock file aside: it holds the last holder's pid)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_refused_rerun_changes_nothing_on_disk(demo_data_dir, tmp_path):
    out = tmp_path / "run"
    assert train(smoke(demo_data_dir, out, lr=1e-3), progress=False)["status"] == "completed"
    before = snapshot(out)
    assert {"config.json", "metrics.json"} <= set(before) and any(k.startswith("checkpoints/") for k in before)
    with pytest.raises(ConfigError, match=r"different configuration \(lr 0.001 -> 0.005\)"):
        train(smoke(demo_data_dir, out, lr=5e-3), progress=False)
    assert snapshot(out) == before


def test_a_run_without_a_recorded_fingerprint_is_checked_against_its_checkpoint(demo_data_dir, tmp_path):
    # config.json lost (or a run from before fingerprints): the checkpoint's own configuration still refuses
    out = tmp_path / "run"
    train(smoke(demo_data_dir, out, lr=1e-3, max_steps=2), progress=False)
    (out / "config.json").unlink()
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"different configuration \(\{'lr': \(0.001, 0.005\)\}\)"):
        train(smoke(demo_data_dir, out, lr=5e-3), progress=False)
    assert snapshot(out) == before


def test_resume_keeps_original_commit_and_appends_each_resume(demo_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(records, "git_commit", lambda: "commit-a")
    train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    # a second session, with other code, resumes the run (cut before it recorded its end)
    monkeypatch.setattr(records, "git_commit", lambda: "commit-b")
    (out / "metrics.json").unlink()
    train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    record = json.loads((out / "config.json").read_text())
    assert record["git_commit"] == "commit-a"
    assert [r["git_commit"] for r in record["resumes"]] == ["commit-b"]
    assert record["resumes"][0]["time"]


def test_checkpoint_of_another_format_is_refused_naming_it(demo_data_dir, tmp_path):
    out = tmp_path / "run"
    train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    state = torch.load(checkpoint_paths(out / "checkpoints")[0], weights_only=True)
    state["format"] = runstate.CHECKPOINT_FORMAT + 1
    save_checkpoint(out / "checkpoints", state["global_step"] + 1, state)
    (out / "metrics.json").unlink()
    before = snapshot(out)
    with pytest.raises(ConfigError, match=f"checkpoint format {runstate.CHECKPOINT_FORMAT + 1}, this clipstudy "
                                          f"reads format {runstate.CHECKPOINT_FORMAT}"):
        train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    assert snapshot(out) == before


def test_metrics_of_a_failure_have_one_schema(tmp_path):
    failed = records.failure_metrics(cell="adamw-clip-s0", profile="smoke", optimizer="adamw",
                                     base_optimizer="adamw", loss="clip", seed=0, error="E: x")
    records.write_metrics(tmp_path, failed)
    assert records.read_metrics(tmp_path) == failed
    assert set(failed) == {"status", "cell", "profile", "optimizer", "base_optimizer", "loss", "seed", "error",
                           "git_commit"}
    (tmp_path / "metrics.json").write_text("{not json")
    assert records.read_metrics(tmp_path)["status"] == records.FAILED
    assert records.read_metrics(tmp_path / "absent") is None
    with pytest.raises(ValueError, match="status"):
        records.write_metrics(tmp_path, {"status": "done"})


def test_training_and_evaluate_command_evaluate_at_the_same_precision(demo_data_dir, tmp_path, monkeypatch):
    import clipstudy.evaluate as evaluate_mod

    seen = []
    real = evaluate_mod.evaluate_all

    def spy(*args, **kwargs):
        seen.append(kwargs.get("amp"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "evaluate_all", spy)
    # the policy answers bf16 (as on a GPU); CPU autocast to bf16 runs, only slower
    monkeypatch.setattr(precision, "choose_amp", lambda amp, device: torch.bfloat16)
    out = tmp_path / "run"
    train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    assert clipstudy_main(["evaluate", "--run", str(out), "--json"]) == 0
    assert seen == [torch.bfloat16, torch.bfloat16]
