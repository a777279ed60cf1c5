"""The disk cache: listing, clearing by kind and age, LRU eviction, locks, interrupted deletes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from quantgate import atomic, cache
from quantgate.atomic import file_lock
from quantgate.cli import main
from quantgate.quant.calibration import StatsCache
from quantgate.units import format_size, parse_duration, parse_size

NOW = time.time()
DAY = 86400.0


def _file(path: Path, size: int, age_days: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age_days * DAY, NOW - age_days * DAY))
    return path


def _dir(path: Path, size: int, age_days: float) -> Path:
    _file(path / "weights.safetensors", size, age_days)
    os.utime(path, (NOW - age_days * DAY, NOW - age_days * DAY))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A cache with one entry of each kind, each of a distinct size and age."""
    r = tmp_path / "cache"
    _dir(r / "synthetic/components/fluxtransformer2dmodel-aaaa", 4000, age_days=10)
    _dir(r / "synthetic/pipelines/flux-schnell-tiny-bbbb", 100, age_days=1)
    _file(r / "synthetic/.lock", 0, age_days=0)
    _file(r / "calibration/k1.safetensors", 3000, age_days=20)
    _file(r / "calibration/k1.json", 50, age_days=20)
    _dir(r / "quantized/q1", 2000, age_days=3)
    _dir(r / "lora/flux-dev-cccc", 500, age_days=30)
    _file(r / "lora/flux-dev-cccc.lock", 0, age_days=30)
    _dir(r / "inductor/fxgraph", 1000, age_days=0.5)
    os.utime(r / "inductor", (NOW - 0.5 * DAY, NOW - 0.5 * DAY))
    return r


def _names(entries) -> list[str]:
    return sorted(e.name for e in entries)


def test_entries_per_kind_with_sizes_and_last_use(root: Path) -> None:
    found = {e.name: e for e in cache.entries(root)}
    assert set(found) == {
        "synthetic/components/fluxtransformer2dmodel-aaaa", "synthetic/pipelines/flux-schnell-tiny-bbbb",
        "calibration/k1", "quantized/q1", "lora/flux-dev-cccc", "inductor",
    }
    assert found["calibration/k1"].size == 3050  # the pair is one entry
    assert [p.suffix for p in found["calibration/k1"].paths] == [".safetensors", ".json"]
    assert found["quantized/q1"].size == 2000
    assert found["quantized/q1"].last_used == pytest.approx(NOW - 3 * DAY)
    assert found["lora/flux-dev-cccc"].lock == root / "lora/flux-dev-cccc.lock"
    assert found["synthetic/pipelines/flux-schnell-tiny-bbbb"].lock == root / "synthetic/.lock"
    assert _names(cache.entries(root, ["quantized", "lora"])) == ["lora/flux-dev-cccc", "quantized/q1"]
    with pytest.raises(ValueError, match="unknown cache kind"):
        cache.entries(root, ["wheights"])


def test_clear_by_kind_and_age(root: Path) -> None:
    out = cache.clear(root, ["calibration", "quantized"], older_than=7 * DAY, now=NOW)
    assert _names(out.removed) == ["calibration/k1"]  # quantized/q1 is 3 days old
    assert out.freed == 3050
    assert not (root / "calibration/k1.json").exists() and not (root / "calibration/k1.safetensors").exists()
    assert (root / "quantized/q1").is_dir() and (root / "lora/flux-dev-cccc").is_dir()

    out = cache.clear(root, older_than=7 * DAY, now=NOW)
    assert _names(out.removed) == ["lora/flux-dev-cccc", "synthetic/components/fluxtransformer2dmodel-aaaa"]
    assert (root / "lora/flux-dev-cccc.lock").exists()  # lock files stay: others may be waiting on them
    assert _names(cache.entries(root)) == ["inductor", "quantized/q1", "synthetic/pipelines/flux-schnell-tiny-bbbb"]


def test_evict_removes_least_recently_used_first(root: Path) -> None:
    total = sum(e.size for e in cache.entries(root))
    assert total == 4000 + 100 + 3050 + 2000 + 500 + 1000
    # Oldest first: lora (30 d, 500), calibration (20 d, 3050), component (10 d, 4000) -> 2,100 left.
    out = cache.evict(root, max_size=3500)
    assert [e.name for e in out.removed] == ["lora/flux-dev-cccc", "calibration/k1",
                                             "synthetic/components/fluxtransformer2dmodel-aaaa"]
    assert sum(e.size for e in cache.entries(root)) == 3100 <= 3500
    assert cache.evict(root, max_size=3500).removed == []  # already under the limit


def test_mark_used_moves_an_entry_to_the_back_of_the_queue(root: Path) -> None:
    cache.mark_used(root / "lora/flux-dev-cccc")  # now: newest of all
    out = cache.evict(root, max_size=10_650 - 3050)
    assert [e.name for e in out.removed] == ["calibration/k1"]


def test_a_locked_entry_survives_clear_and_eviction(root: Path) -> None:
    with file_lock(root / "lora/flux-dev-cccc.lock"):
        out = cache.evict(root, max_size=0)
        assert _names(out.locked) == ["lora/flux-dev-cccc"]
        assert (root / "lora/flux-dev-cccc/weights.safetensors").is_file()
    with file_lock(root / "synthetic/.lock"):  # a run materializing synthetic weights
        _dir(root / "synthetic/components/x-1", 10, age_days=40)
        out = cache.clear(root, ["synthetic"])
        assert out.removed == [] and _names(out.locked) == ["synthetic/components/x-1"]
    removed = _names(cache.clear(root).removed)  # the locks are released: now they go
    assert "lora/flux-dev-cccc" in removed and "synthetic/components/x-1" in removed
    assert cache.entries(root) == []


def test_an_interrupted_delete_never_leaves_a_valid_looking_entry(root: Path, monkeypatch) -> None:
    # Directory: the crash after the rename leaves only a .trash- name, listed as trash.
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
    assert cache.remove(next(e for e in cache.entries(root) if e.name == "quantized/q1"))
    assert not (root / "quantized/q1").exists()
    assert [p.name.startswith(".trash-q1-") for p in (root / "quantized").iterdir()] == [True]
    assert [e.name.startswith("quantized/.trash-q1-") for e in cache.entries(root, ["trash"])] == [True]
    monkeypatch.undo()
    # File group: with its tensors gone, the reader refuses the remaining JSON.
    stats = StatsCache(root / "calibration")
    stats.save("k2", {"layer": {"absmax": torch.ones(3)}}, {"facts": 1})
    assert stats.load("k2") is not None
    (root / "calibration/k2.safetensors").unlink()  # what remove() does first
    assert stats.load("k2") is None
    # A killed build's temporary directory is trash once a day old; a fresh one may be live.
    _dir(root / "quantized/.tmp-q9-abc", 10, age_days=2)
    _dir(root / "quantized/.tmp-q8-abc", 10, age_days=0.1)
    _file(root / "calibration/.k3.safetensors.123.tmp", 10, age_days=2)
    assert _names(cache.entries(root, ["trash"]))[:2] == ["calibration/.k3.safetensors.123.tmp",
                                                          "quantized/.tmp-q9-abc"]
    assert len(cache.entries(root, ["trash"])) == 3  # + the interrupted delete above
    # Trash is always cleared, whatever its age.
    out = cache.clear(root, older_than=365 * DAY, now=NOW)
    assert [e.kind for e in out.removed] == ["trash"] * 3
    assert cache.entries(root, ["trash"]) == []
    assert (root / "quantized/.tmp-q8-abc").is_dir()


def test_units() -> None:
    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("16G") == 16 * 2**30
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("16000MiB") == 16000 * 2**20
    assert parse_size("1.5 GiB") == 3 * 2**29
    for bad in ("", "16 bananas", "-1GiB", "GiB", "0GiB", "16GiBs"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    assert parse_duration("7d") == 7 * DAY
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("30m") == 1800
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("7 days")
    assert format_size(3 * 2**29) == "1.5 GiB"


def test_cli_list_and_clear(root: Path, capsys) -> None:
    assert main(["cache", "list", "--cache-dir", str(root), "-v"]) == 0
    out = capsys.readouterr().out
    assert "quantized        1 entries" in out and "quantized/q1" in out
    assert "total            6 entries" in out
    # Ages are relative to the real clock; make quantized/q1 recent and everything else old.
    now = time.time()
    for e in cache.entries(root):
        for p in e.paths:
            os.utime(p, (now - 30 * DAY, now - 30 * DAY))
    os.utime(root / "quantized/q1", (now - 3600, now - 3600))
    assert main(["cache", "clear", "--cache-dir", str(root), "--what", "quantized,lora", "--older-than", "7d"]) == 0
    out = capsys.readouterr().out
    assert "removed lora/flux-dev-cccc" in out and "quantized/q1" not in out
    assert main(["cache", "clear", "--cache-dir", str(root), "--what", "wheights"]) == 2
    assert "unknown cache kind" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-dir", str(root), "--max-size", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-dir", str(root), "--dry-run"]) == 0
    assert "would remove quantized/q1" in capsys.readouterr().out
    assert (root / "quantized/q1").is_dir()
    # Eviction dry run: the oldest go first until the rest fits (q1, 2,000 bytes, is the newest).
    assert main(["cache", "clear", "--cache-dir", str(root), "--max-size", "2000", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove quantized/q1" not in out and "would remove inductor" in out
    assert (root / "inductor").is_dir()


def test_reusing_an_entry_marks_it_used(tiny_cache: Path, tiny_flux_dir: Path) -> None:
    from quantgate.models import get_model
    from quantgate.models.synthetic import materialize

    old = time.time() - 30 * DAY
    component = (tiny_flux_dir / "transformer").resolve()
    for path in (tiny_flux_dir, component):
        os.utime(path, (old, old), follow_symlinks=False)
    assert materialize(get_model("flux-schnell"), "tiny", tiny_cache, progress=False) == tiny_flux_dir
    assert tiny_flux_dir.lstat().st_mtime > old + DAY and component.stat().st_mtime > old + DAY

    stats = StatsCache(tiny_cache / "calibration-test")
    stats.save("k", {"layer": {"absmax": torch.ones(2)}}, {})
    for path in (tiny_cache / "calibration-test").iterdir():
        os.utime(path, (old, old))
    assert stats.load("k") is not None
    assert all(p.stat().st_mtime > old + DAY for p in (tiny_cache / "calibration-test").iterdir())
