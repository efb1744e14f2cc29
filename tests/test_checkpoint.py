"""Checkpoints: atomic, verified, damaged ones skipped with a warning; locks released by a killed holder."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from clipstudy.checkpoint import (CellBusy, CheckpointError, cell_lock, checkpoint_paths, is_locked,
                                  load_latest, load_verified, save_checkpoint)


def state(v):
    return {"w": torch.full((3,), float(v)), "step": v, "rng": (1, 2, [3, 4])}


def test_keep_newest_and_roundtrip(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-00000003.pt", "ckpt-00000002.pt"]
    loaded, path, warnings = load_latest(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.full((3,), 3.0)) and not warnings


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "garbage"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage):
    save_checkpoint(tmp_path, 1, state(1))
    latest = save_checkpoint(tmp_path, 2, state(2))
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        latest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "no_sidecar":
        latest.with_name(latest.name + ".sha256").unlink()
    else:
        latest.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_verified(latest)
    loaded, path, warnings = load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "ckpt-00000001.pt"
    assert len(warnings) == 1 and "ckpt-00000002.pt" in warnings[0]


def test_unsafe_pickle_is_refused(tmp_path):
    # A checkpoint carrying an arbitrary object must not be unpickled (weights_only loading).
    import hashlib
    import io

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    path = tmp_path / "ckpt-00000005.pt"
    path.write_bytes(buf.getvalue())
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(buf.getvalue()).hexdigest())
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_verified(path)


def test_lock_excludes_and_is_released_by_kill(tmp_path):
    with cell_lock(tmp_path):
        assert is_locked(tmp_path)
        with pytest.raises(CellBusy):
            with cell_lock(tmp_path):
                pass
    assert not is_locked(tmp_path)
    code = ("import sys, time; from clipstudy.checkpoint import cell_lock\n"
            "with cell_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert is_locked(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # once the holder is reaped its files are closed: the kernel has dropped the lock
    assert not is_locked(tmp_path)
