"""Atomic writes: a new version appears whole or not at all, also when the writer is killed."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantgate.atomic import atomic_directory, atomic_write_bytes, atomic_write_json, remove_tree


def test_atomic_write_replaces_the_content(tmp_path):
    path = tmp_path / "a" / "f.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    assert path.read_text() == '{\n  "v": 2\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_a_failing_directory_build_leaves_the_old_one(tmp_path):
    final = tmp_path / "d"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "x").write_text("new")
        raise RuntimeError("interrupted")
    assert (final / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_remove_tree_handles_files_links_and_absence(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "d")
    for name in ("l", "d", "f", "absent"):
        remove_tree(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys
from quantgate.atomic import atomic_write_bytes
path = sys.argv[1]
print("ready", flush=True)
i = 0
while True:
    i += 1
    atomic_write_bytes(path, bytes([i % 256]) * (8 << 20))
"""


def test_a_writer_killed_mid_write_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "cache.bin"
    atomic_write_bytes(path, b"\0" * (8 << 20))
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(0.5)  # several complete 8 MiB writes, and very likely one in flight
    child.send_signal(signal.SIGKILL)
    child.wait()
    data = path.read_bytes()
    assert len(data) == 8 << 20 and data == data[:1] * len(data)
    # The killed write's temporary file may remain, hidden, never under the real name.
    assert all(p.name.startswith(".cache.bin.") for p in tmp_path.iterdir() if p != path)
    os.sync()


def test_atomic_file_publishes_on_success_and_removes_the_temporary_on_failure(tmp_path):
    from quantgate.atomic import atomic_file

    path = tmp_path / "stats.safetensors"
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".stats.safetensors.")
        tmp.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]


def _two_versions(tmp_path, interrupt_at: str, monkeypatch) -> Path:
    """Replace version "old" of a directory by "new", interrupted (KeyboardInterrupt) at one step."""
    import quantgate.atomic as atomic

    final = tmp_path / "golden"
    with atomic_directory(final) as tmp:
        (tmp / "manifest.json").write_text("old")
    real_rename, real_exchange = os.rename, atomic.exchange
    calls = {"rename": 0}

    def rename(a, b):
        calls["rename"] += 1
        if interrupt_at == f"rename{calls['rename']}":
            raise KeyboardInterrupt
        return real_rename(a, b)

    def exchange(a, b):
        if interrupt_at == "after-exchange":
            assert real_exchange(a, b)
            raise KeyboardInterrupt
        return False if interrupt_at.startswith("rename") else real_exchange(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    monkeypatch.setattr(atomic, "exchange", exchange)
    with contextlib.suppress(KeyboardInterrupt), atomic_directory(final) as tmp:
        (tmp / "manifest.json").write_text("new")
    monkeypatch.undo()
    return final


@pytest.mark.parametrize("step, expect", [
    ("after-exchange", "new"),  # the one-step swap happened: the new set is in place
    ("rename1", "old"),         # without renameat2: interrupted moving the old one aside
    ("rename2", "old"),         # ... or renaming the new one in: the old one is moved back
    ("none", "new"),
])
def test_replacing_a_directory_interrupted_at_any_step_leaves_one_complete_version(tmp_path, monkeypatch, step,
                                                                                    expect):
    final = _two_versions(tmp_path, step, monkeypatch)
    assert (final / "manifest.json").read_text() == expect
    assert [p.name for p in tmp_path.iterdir()] == ["golden"]  # nothing stranded beside it


def test_directories_are_exchanged_in_one_step_on_linux(tmp_path):
    import sys

    from quantgate.atomic import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange(a, b):
        assert not sys.platform.startswith("linux"), "renameat2(RENAME_EXCHANGE) is available on Linux >= 3.15"
        pytest.skip("this platform has no atomic exchange of two paths (renameat2): the fallback is tested above")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_cache_this_process_cannot_write_is_read_without_a_lock(tmp_path, monkeypatch):
    import builtins
    import errno

    from quantgate.atomic import file_lock

    real_open = builtins.open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    ran = []
    with file_lock(tmp_path / "entry.lock"):
        ran.append(True)
    assert ran == [True]
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"), file_lock(tmp_path / "entry.lock"):
        pass


def test_written_files_and_directories_follow_the_umask(tmp_path):
    from quantgate.atomic import atomic_write_text

    old = os.umask(0o002)  # a group-shared runner cache
    try:
        with atomic_directory(tmp_path / "entry") as tmp:
            (tmp / "x").write_text("x")
        atomic_write_text(tmp_path / "entry.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "entry").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "entry.json").stat().st_mode & 0o777 == 0o664


def test_a_full_disk_names_the_file_the_free_space_and_how_to_free_more(tmp_path):
    import errno

    from quantgate.atomic import atomic_file
    from quantgate.errors import DiskFull

    atomic_write_json(tmp_path / "kept.json", {"v": 1})
    with pytest.raises(DiskFull, match="kept.json: the disk is full .* GiB free .*quantgate cache clear --max-size"), \
            atomic_file(tmp_path / "kept.json"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFull, match="entry: the disk is full"), atomic_directory(tmp_path / "entry"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads((tmp_path / "kept.json").read_text()) == {"v": 1}  # the old version stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]
