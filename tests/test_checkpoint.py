"""Checkpoints: atomic, verified, damaged ones skipped with a warning; locks released by a killed holder."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from clipstudy.engine.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    checkpoint_paths,
    load_latest,
    load_verified,
    remove_stale_temporaries,
    save_checkpoint,
)
from clipstudy.fileio import CellBusy, cell_lock, is_locked


def state(v):
    return {"w": torch.full((3,), float(v)), "step": v, "rng": (1, 2, [3, 4])}


def test_keep_newest_and_roundtrip(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, state(step))  # keeps the newest two by default
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-00000003.pt", "ckpt-00000002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000002.pt",
        "ckpt-00000002.pt.sha256",
        "ckpt-00000003.pt",
        "ckpt-00000003.pt.sha256",
    ]
    loaded, path, warnings = load_latest(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.full((3,), 3.0)) and not warnings
    save_checkpoint(tmp_path, 4, state(4), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.pt", "ckpt-00000004.pt.sha256"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "garbage"])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage):
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
    with caplog.at_level("WARNING", logger="clipstudy.engine.checkpoint"):
        loaded, path, warnings = load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "ckpt-00000001.pt"
    assert len(warnings) == 1 and "ckpt-00000002.pt" in warnings[0]
    assert [r.getMessage() for r in caplog.records] == warnings  # logged as well as returned


def test_unreadable_checkpoint_is_named(tmp_path):
    (tmp_path / "ckpt-00000001.pt").mkdir()  # not a file: cannot be read
    with pytest.raises(CheckpointError, match=r"ckpt-00000001\.pt: cannot read \(\[Errno 21\] Is a directory"):
        load_verified(tmp_path / "ckpt-00000001.pt")


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
    code = (
        "import sys, time; from clipstudy.fileio import cell_lock\n"
        "with cell_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert is_locked(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # once the holder is reaped its files are closed: the kernel has dropped the lock
    assert not is_locked(tmp_path)


def test_failed_write_keeps_older_checkpoints_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    for step in (1, 2):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_fsync = os.fsync

    def full_disk(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".ckpt-00000003.pt.sha256."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)  # the checkpoint lands, its digest does not
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(tmp_path, 3, {**state(3), "big": torch.zeros(2**19)}, keep=2)  # 2 MiB of float32
    assert str(caught.value) == (
        f"cannot write checkpoint {tmp_path / 'ckpt-00000003.pt'} (2.0 MiB): No space left on device. Free disk "
        f"space or make {tmp_path} writable, then rerun the same command: it resumes from the newest checkpoint "
        "still there"
    )
    assert isinstance(caught.value.__cause__, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no digest-less checkpoint, no temporary
    loaded, path, warnings = load_latest(tmp_path)
    assert loaded["step"] == 2 and not warnings


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    leftovers = [tmp_path / ".ckpt-00000004.pt.ab12.tmp", tmp_path / ".metrics.json.x.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "ckpt-00000001.pt"]
    for p in leftovers + kept:
        p.write_bytes(b"x")
    (tmp_path / ".dir.tmp").mkdir()  # a folder, not a leftover file
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(leftovers)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in leftovers)
    assert (tmp_path / ".dir.tmp").is_dir()
    assert remove_stale_temporaries(tmp_path / "absent") == []


def test_atomic_writes_keep_plain_file_permissions_and_json_of_paths_and_scalars(tmp_path):
    from pathlib import Path

    from clipstudy.fileio import write_json

    umask = os.umask(0o027)
    try:
        write_json(tmp_path / "sub" / "a.json", {"path": Path("/x/y"), "n": torch.tensor(3), "f": 1.5})
    finally:
        os.umask(umask)
    written = tmp_path / "sub" / "a.json"
    assert written.read_text() == '{\n  "path": "/x/y",\n  "n": 3,\n  "f": 1.5\n}\n'
    assert written.stat().st_mode & 0o777 == 0o640
    umask = os.umask(0o022)  # the usual umask: rw for the owner, r for the others (no execute bit for anyone)
    try:
        write_json(tmp_path / "sub" / "c.json", {})
    finally:
        os.umask(umask)
    assert (tmp_path / "sub" / "c.json").stat().st_mode & 0o777 == 0o644
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(tmp_path / "b.json", {"x": object()})
    assert not (tmp_path / "b.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_atomic_write_names_the_file_its_size_and_why(tmp_path):
    import errno

    from clipstudy.errors import WriteFailure
    from clipstudy.fileio import atomic_write_bytes

    (tmp_path / "old.txt").write_text("kept")
    blocker = tmp_path / "taken"
    blocker.write_text("a file where a folder should be")
    target = blocker / "out.json"
    with pytest.raises(WriteFailure) as caught:
        atomic_write_bytes(target, b"12345")
    assert str(caught.value) == (
        f"cannot write {target} (5 bytes): File exists. Free disk space or make {blocker} "
        "writable, then rerun the same command; the file keeps its previous content"
    )
    assert (caught.value.path, caught.value.size, caught.value.errno) == (target, 5, errno.EEXIST)
    with pytest.raises(CheckpointWriteError) as caught:
        save_checkpoint(blocker, 7, state(7))
    import io

    serialised = io.BytesIO()
    torch.save(state(7), serialised)
    assert (caught.value.path, caught.value.size, caught.value.errno) == (
        blocker / "ckpt-00000007.pt",
        len(serialised.getvalue()),
        errno.EEXIST,
    )


def test_atomic_writes_make_missing_folders_and_stage_where_the_cleaner_looks(tmp_path, monkeypatch):
    from clipstudy.fileio import atomic_write_bytes

    staged = []
    real_replace = os.replace

    def spy(src, dst):
        staged.append(os.path.basename(src))
        assert os.path.dirname(src) == os.path.dirname(dst)  # same folder: the rename is atomic
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "a" / "b" / "results.json"
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    # a writer killed before the rename leaves exactly what remove_stale_temporaries deletes
    assert len(staged) == 1 and staged[0].startswith(".results.json.") and staged[0].endswith(".tmp")


def test_umask_falls_back_to_the_usual_022_without_proc(monkeypatch):
    from pathlib import Path

    from clipstudy import fileio

    current = os.umask(0o027)  # not the fallback's value, so reading /proc is what this checks
    try:
        assert fileio._umask() == 0o027
    finally:
        os.umask(current)

    def no_proc(self, *args, **kwargs):
        raise OSError("no /proc")

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert fileio._umask() == 0o022
