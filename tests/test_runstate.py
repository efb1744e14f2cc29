"""Resume: checks before any write, the checkpoint format, the resume log, one precision policy."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.core import precision
from clipstudy.engine import records, runstate
from clipstudy.engine.checkpoint import checkpoint_paths, save_checkpoint
from clipstudy.engine.config import ConfigError, make_config
from clipstudy.engine.train import train


def smoke(demo_data_dir, out, **kw):
    return make_config("smoke", data=str(demo_data_dir), out=str(out), threads=1, epochs=1, **kw)


def snapshot(folder: Path) -> dict:
    """Digest of every file under ``folder`` (the lock file aside: it holds the last holder's pid)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


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
    with pytest.raises(
        ConfigError,
        match=f"checkpoint format {runstate.CHECKPOINT_FORMAT + 1}, this clipstudy "
        f"reads format {runstate.CHECKPOINT_FORMAT}",
    ):
        train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    assert snapshot(out) == before


def test_metrics_of_a_failure_have_one_schema(tmp_path):
    failed = records.failure_metrics(
        cell="adamw-clip-s0",
        profile="smoke",
        optimizer="adamw",
        base_optimizer="adamw",
        loss="clip",
        seed=0,
        error="E: x",
    )
    records.write_metrics(tmp_path, failed)
    assert records.read_metrics(tmp_path) == failed
    assert set(failed) == {
        "status",
        "cell",
        "profile",
        "optimizer",
        "base_optimizer",
        "loss",
        "seed",
        "error",
        "git_commit",
    }
    (tmp_path / "metrics.json").write_text("{not json")
    assert records.read_metrics(tmp_path)["status"] == records.FAILED
    assert records.read_metrics(tmp_path / "absent") is None
    with pytest.raises(ValueError, match="status"):
        records.write_metrics(tmp_path, {"status": "done"})


def test_training_and_evaluate_command_evaluate_at_the_same_precision(demo_data_dir, tmp_path, monkeypatch):
    import clipstudy.engine.evaluate as evaluate_mod

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
    # training's one validation pass (the cut at step 2), its test pass at the end, the command's own
    assert seen == [torch.bfloat16, torch.bfloat16, torch.bfloat16]


# --------------------------------------------------------------------------
# Random generators, captured and restored state, the refusal texts (unit level)
# --------------------------------------------------------------------------


def draws() -> tuple:
    """One value from each generator a run uses (Gaussian draws exercise the cached-normal fields)."""
    import random

    import numpy as np

    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.random_sample()),
        float(np.random.standard_normal()),
        torch.rand(2).tolist(),
    )


@pytest.mark.parametrize("seed", [7, 2**32 + 7])
def test_seed_everything_seeds_python_numpy_and_torch(seed):
    import random

    import numpy as np

    runstate.seed_everything(seed)
    expected_numpy = np.random.RandomState(seed % 2**32)  # numpy takes seeds below 2**32 only
    assert random.random() == random.Random(seed).random()
    assert np.random.random_sample() == expected_numpy.random_sample()
    assert torch.rand(3).tolist() == torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    import random

    import numpy as np

    runstate.seed_everything(3)
    random.gauss(0, 1)  # leave a cached Gaussian in both generators
    np.random.standard_normal()
    torch.save({"rng": runstate.rng_state()}, tmp_path / "state.pt")
    expected = draws()
    runstate.seed_everything(99)
    runstate.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    assert draws() == expected


def test_set_rng_state_accepts_the_python_state_as_lists():
    # A state that went through a format without tuples (JSON, some loaders) still restores Python's generator.
    import random

    runstate.seed_everything(5)
    state = runstate.rng_state()
    version, internal, gauss = state["python"]
    state["python"] = [version, list(internal), gauss]
    expected = random.random()
    random.seed(0)
    runstate.set_rng_state(state)
    assert random.random() == expected


class _Config:
    def __init__(self, **fields):
        self.fields = fields

    def to_dict(self):
        return dict(self.fields)


def _fake_run(seed: int, init_scale: float):
    from types import SimpleNamespace

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    loss = torch.nn.Module()
    loss.register_buffer("u", torch.rand(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.rand(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # enabled: its scale is state to restore
    return SimpleNamespace(
        model=model,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        config=_Config(lr=0.1, loss="clip"),
    )


def test_capture_then_restore_brings_back_every_part_of_a_run():
    saved = _fake_run(seed=1, init_scale=1024.0)
    state = runstate.capture_state(
        saved, epoch=2, batch_in_epoch=5, global_step=17, history=[{"step": 17}], epochs=[{"epoch": 1}], elapsed=12.5
    )
    assert state["format"] == runstate.CHECKPOINT_FORMAT
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"], state["elapsed"]) == (2, 5, 17, 12.5)
    assert state["history"] == [{"step": 17}] and state["epochs"] == [{"epoch": 1}]
    assert json.loads(state["config"]) == {"lr": 0.1, "loss": "clip"}
    expected = draws()

    fresh = _fake_run(seed=2, init_scale=8.0)
    runstate.restore_state(fresh, state)
    for got, want in zip(fresh.model.state_dict().values(), saved.model.state_dict().values()):
        assert torch.equal(got, want)
    assert torch.equal(fresh.loss.u, saved.loss.u)
    momentum = [fresh.optimizer.state[p]["momentum_buffer"] for p in fresh.model.parameters()]
    assert all(
        torch.equal(a, saved.optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, saved.model.parameters())
    )
    assert fresh.scheduler.get_last_lr() == saved.scheduler.get_last_lr() == [0.05]
    assert fresh.scaler.get_scale() == 1024.0
    assert draws() == expected


def test_refusals_name_the_file_the_change_and_the_way_out(tmp_path):
    path = tmp_path / "checkpoints" / "step_00000004.pt"
    with pytest.raises(ConfigError) as raised:
        runstate.check_resume_compatible(
            _Config(lr=0.005, max_steps=9), json.dumps({"lr": 0.001, "max_steps": 4}), path
        )
    assert str(raised.value) == (
        f"{path} was written with a different configuration ({{'lr': (0.001, 0.005)}}); "
        "resume with the same settings or use a new output directory"
    )
    runstate.check_resume_compatible(_Config(lr=0.001, max_steps=9), json.dumps({"lr": 0.001, "max_steps": 4}), path)

    with pytest.raises(ConfigError) as raised:
        runstate.check_checkpoint_format({"format": 0}, path)
    assert str(raised.value) == (
        f"{path}: checkpoint format 0, this clipstudy reads format "
        f"{runstate.CHECKPOINT_FORMAT}; resume it with the clipstudy version that wrote "
        "it, or use a new output directory"
    )
    runstate.check_checkpoint_format({"format": runstate.CHECKPOINT_FORMAT}, path)

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"fingerprint": {"digest": "a", "fields": {"lr": 0.001}}}))
    with pytest.raises(ConfigError) as raised:
        runstate.check_recorded_fingerprint(out, {"digest": "b", "fields": {"lr": 0.005}})
    message = str(raised.value)
    assert message.startswith(f"{out} was written with a different configuration (")
    assert message.endswith(
        "); resume with the same settings, or use a new output directory (--out, or a --label for a variant)"
    )
    runstate.check_recorded_fingerprint(out, {"digest": "a", "fields": {"lr": 0.001}})


def _checkpointed_run(tmp_path, steps=(2, 4), metrics: dict | None = None):
    """A run folder with checkpoints at ``steps`` (from a fake run) and, optionally, its metrics.json."""
    out = tmp_path / "run"
    saved = _fake_run(seed=1, init_scale=8.0)
    for step in steps:
        state = runstate.capture_state(
            saved,
            epoch=1,
            batch_in_epoch=step,
            global_step=step,
            history=[{"step": s} for s in range(1, step + 1)],
            epochs=[{"epoch": 1}],
            elapsed=1.0,
        )
        save_checkpoint(out / "checkpoints", step, state)
    if metrics is not None:
        records.write_metrics(out, metrics)
    return out


class _Asked:
    def __init__(self, max_steps=0):
        self.max_steps = max_steps


FINGERPRINT = {"digest": "a", "fields": {}}


def test_already_complete_only_for_a_finished_run_recorded_at_its_intact_newest_checkpoint(tmp_path, capsys):
    assert runstate.already_complete(tmp_path / "none", _Asked(), FINGERPRINT) is None  # no checkpoint
    done = {"status": "completed", "global_step": 4}
    out = _checkpointed_run(tmp_path, metrics=done)
    assert runstate.already_complete(out, _Asked(), FINGERPRINT) == done
    assert capsys.readouterr().err == f"{out}: already complete (completed); nothing to do\n"
    assert runstate.already_complete(out, _Asked(), FINGERPRINT, announce=False) == done
    assert capsys.readouterr().err == ""

    records.write_metrics(out, {"status": "completed", "global_step": 2})  # recorded at the older checkpoint
    assert runstate.already_complete(out, _Asked(), FINGERPRINT) is None
    records.write_metrics(out, {"status": "failed", "global_step": 4})
    assert runstate.already_complete(out, _Asked(), FINGERPRINT) is None
    records.write_metrics(out, done)
    newest = checkpoint_paths(out / "checkpoints")[0]
    newest.write_bytes(newest.read_bytes()[:-1] + b"x")  # damaged: resume falls back and trains on
    assert runstate.already_complete(out, _Asked(), FINGERPRINT) is None
    assert capsys.readouterr().err == ""


def test_a_run_cut_by_max_steps_is_complete_only_for_requests_that_stop_no_later(tmp_path, capsys):
    cut = {"status": "completed", "global_step": 4, "truncated": True, "steps_completed": 4, "steps_total": 10}
    out = _checkpointed_run(tmp_path, metrics=cut)
    assert runstate.already_complete(out, _Asked(max_steps=4), FINGERPRINT) == cut
    assert capsys.readouterr().err == f"{out}: already complete (completed, stopped at step 4 of 10); nothing to do\n"
    assert runstate.already_complete(out, _Asked(max_steps=6), FINGERPRINT) is None
    assert runstate.already_complete(out, _Asked(max_steps=0), FINGERPRINT) is None


def test_already_complete_refuses_a_run_that_recorded_another_fingerprint(tmp_path):
    out = _checkpointed_run(tmp_path, metrics={"status": "completed", "global_step": 4})
    (out / "config.json").write_text(json.dumps({"fingerprint": {"digest": "other", "fields": {}}}))
    with pytest.raises(ConfigError, match="was written with a different configuration"):
        runstate.already_complete(out, _Asked(), FINGERPRINT)


def test_resume_restores_the_newest_checkpoint_and_says_where_it_continues(tmp_path, capsys):
    assert runstate.resume(_fake_run(seed=2, init_scale=8.0), tmp_path / "none") is None
    out = _checkpointed_run(tmp_path)
    run = _fake_run(seed=2, init_scale=8.0)
    point = runstate.resume(run, out)
    newest = checkpoint_paths(out / "checkpoints")[0]
    assert (point.path, point.epoch, point.batch_in_epoch, point.global_step, point.elapsed) == (newest, 1, 4, 4, 1.0)
    assert point.history == [{"step": s} for s in range(1, 5)] and point.epochs == [{"epoch": 1}]
    assert capsys.readouterr().err == f"resumed from {newest} (epoch 2, batch 4, step 4)\n"
    assert torch.equal(run.model.weight, _fake_run(seed=1, init_scale=8.0).model.weight)
    assert runstate.resume(_fake_run(seed=2, init_scale=8.0), out, announce=False).global_step == 4
    assert capsys.readouterr().err == ""


def test_resume_warns_once_per_damaged_checkpoint_and_falls_back(tmp_path, capsys):
    out = _checkpointed_run(tmp_path)
    newest, older = checkpoint_paths(out / "checkpoints")
    newest.write_bytes(b"not a checkpoint")
    point = runstate.resume(_fake_run(seed=2, init_scale=8.0), out)
    assert point.path == older and point.global_step == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"WARNING: skipping damaged checkpoint: {newest}: ")
    assert err[1].startswith(f"resumed from {older}")


def test_resume_refusals_name_the_checkpoint(tmp_path):
    out = _checkpointed_run(tmp_path, steps=(2,))
    path = checkpoint_paths(out / "checkpoints")[0]
    run = _fake_run(seed=2, init_scale=8.0)
    run.config = _Config(lr=0.5, loss="clip")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))} was written with a different configuration"):
        runstate.resume(run, out)
    state = torch.load(path, weights_only=True)
    state["format"] = runstate.CHECKPOINT_FORMAT + 1
    newest = save_checkpoint(out / "checkpoints", 3, state)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(newest))}: checkpoint format"):
        runstate.resume(_fake_run(seed=2, init_scale=8.0), out)
