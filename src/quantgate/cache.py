"""What quantgate keeps on disk, and how to list, clear and bound it.

Every cache lives under one root (``default_cache_dir()``: ``$QUANTGATE_CACHE_DIR``, else
``$XDG_CACHE_HOME/quantgate``, else ``~/.cache/quantgate``)::

    synthetic/components/<class>-<digest>/   one synthetic model component (weights + manifest)
    synthetic/pipelines/<model>-<size>-<digest>/  a diffusers directory of symlinks to components
    synthetic/.lock                           held while synthetic weights are built
    calibration/<key>.safetensors + .json     calibration statistics (one entry = the pair)
    quantized/<key>/                          a quantized checkpoint (GPTQ/RTN W4A8 or svdquant-ref layers)
    lora/<model>-<digest>/ (+ .lock)          a synthetic LoRA
    inductor/                                 torch.compile's cache (TORCHINDUCTOR_CACHE_DIR), one entry
    **/.trash-*                               an entry being deleted (renamed away first); always removable
    **/.tmp-*, **/.*.tmp (a day old)          a build that was killed; removable like trash

An entry is one content-addressed directory or file group. Its last use is the newest mtime of
its top-level paths: code that reuses an entry calls :func:`mark_used`, which sets that mtime
(a marker file inside the entry would change the content that manifests verify).

Removal is safe against concurrent runs: an entry guarded by a lock file is removed only while
this process holds that lock (an entry locked by someone else is skipped), and directories are
renamed to a ``.trash-`` name before they are deleted, so a half-deleted entry is never visible
under its real name. A file group loses one file first, which makes the group invalid to its
reader (``StatsCache.load`` needs both files) until the rest is gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from quantgate.atomic import remove_tree

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locks, as in atomic.file_lock
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Entry:
    """One removable unit of a cache: its paths (removed in order), size, last use and lock."""

    kind: str
    name: str
    paths: tuple[Path, ...]
    size: int
    last_used: float
    lock: Path | None = None


@dataclass(frozen=True)
class Kind:
    """A kind of cache entry: where it lives under the root and how to enumerate it."""

    name: str
    description: str
    scan: Callable[[Path], list[Entry]]


def mark_used(*paths: str | os.PathLike[str]) -> None:
    """Record that cache entries at ``paths`` were just reused (for LRU eviction)."""
    for path in paths:
        with contextlib.suppress(OSError):  # a read-only cache still works, it just is not LRU-ordered
            os.utime(path, follow_symlinks=False)


def _size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    if path.is_symlink() or not path.is_dir():
        return st.st_size
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _entry(kind: str, name: str, paths: Sequence[Path], lock: Path | None = None) -> Entry:
    mtimes = [p.lstat().st_mtime for p in paths if p.exists() or p.is_symlink()]
    return Entry(kind, name, tuple(paths), sum(_size(p) for p in paths), max(mtimes, default=0.0), lock)


def _visible_children(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def _dirs(kind: str, sub: str, lock: Callable[[Path], Path | None] = lambda p: None) -> Callable[[Path], list[Entry]]:
    def scan(root: Path) -> list[Entry]:
        return [_entry(kind, f"{sub}/{p.name}", [p], lock(p)) for p in _visible_children(root / sub) if p.is_dir()]
    return scan


def _synthetic(root: Path) -> list[Entry]:
    # One lock for all synthetic weights: materialize() holds it while it checks and builds.
    lock = root / "synthetic" / ".lock"
    return [e for sub in ("pipelines", "components")
            for e in _dirs("synthetic", f"synthetic/{sub}", lambda p: lock)(root)]


def _calibration(root: Path) -> list[Entry]:
    groups: dict[str, list[Path]] = {}
    for p in _visible_children(root / "calibration"):
        if p.is_file():
            groups.setdefault(p.name.split(".", 1)[0], []).append(p)
    # The tensors go first: the (small) JSON left behind still names the entry until removed.
    order = {".safetensors": 0, ".json": 1}
    return [_entry("calibration", f"calibration/{key}", sorted(paths, key=lambda p: order.get(p.suffix, 2)))
            for key, paths in sorted(groups.items())]


def _inductor(root: Path) -> list[Entry]:
    # Inductor's cache cross-references its own files (graphs -> kernels): one entry, all or nothing.
    path = root / "inductor"
    return [_entry("inductor", "inductor", [path])] if path.is_dir() else []


# A build (atomic_directory's ``.tmp-*``, atomic writes' ``.*.tmp``) untouched for this long was
# interrupted (killed): live builds write into theirs continuously.
STALE_BUILD_S = 86400.0


def _trash(root: Path) -> list[Entry]:
    found = []
    now = time.time()
    for directory in [root, *(p for p in root.glob("*") if p.is_dir()), *(p for p in root.glob("*/*") if p.is_dir())]:
        found += list(directory.glob(".trash-*"))
        found += [p for pattern in (".tmp-*", ".*.tmp") for p in directory.glob(pattern)
                  if now - p.lstat().st_mtime > STALE_BUILD_S]
    return [_entry("trash", str(p.relative_to(root)), [p]) for p in sorted(set(found))]


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("synthetic", "synthetic model weights (components and pipeline directories)", _synthetic),
    Kind("calibration", "calibration statistics (activation scales, Hessians)", _calibration),
    Kind("quantized", "quantized checkpoints (GPTQ/RTN W4A8, svdquant-ref)", _dirs("quantized", "quantized")),
    Kind("lora", "synthetic LoRAs", _dirs("lora", "lora", lambda p: p.with_name(p.name + ".lock"))),
    Kind("inductor", "torch.compile (inductor) cache", _inductor),
    Kind("trash", "entries whose deletion was interrupted", _trash),
)}


def _kinds(what: Iterable[str] | None) -> list[Kind]:
    names = list(what) if what else list(KINDS)
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ValueError(f"unknown cache kind(s) {unknown}; known: {', '.join(KINDS)}")
    return [KINDS[n] for n in names]


def entries(root: str | os.PathLike[str], what: Iterable[str] | None = None) -> list[Entry]:
    """Every entry of the kinds ``what`` (default: all) under the cache ``root``."""
    root = Path(root)
    return [e for kind in _kinds(what) for e in kind.scan(root)]


@contextlib.contextmanager
def _try_lock(path: Path | None) -> Iterator[bool]:
    """Hold ``path``'s lock for the block if nobody else does; yields whether it is held."""
    if path is None or fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove(entry: Entry) -> bool:
    """Remove ``entry`` unless another process holds its lock; return whether it was removed.

    The lock file itself stays: deleting a lock file others may be waiting on would let two
    processes hold "the" lock at once.
    """
    with _try_lock(entry.lock) as held:
        if not held:
            return False
        for path in entry.paths:
            remove_tree(path)
    return True


@dataclass
class Outcome:
    """What a clear or an eviction did."""

    removed: list[Entry]
    locked: list[Entry]

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def clear(root: str | os.PathLike[str], what: Iterable[str] | None = None, older_than: float | None = None,
          now: float | None = None, dry_run: bool = False) -> Outcome:
    """Remove entries of the kinds ``what`` (default: all) unused for more than ``older_than`` seconds.

    ``dry_run``: say what would be removed (locks are not checked), remove nothing.
    """
    now = time.time() if now is None else now
    out = Outcome([], [])
    for entry in entries(root, what):
        if older_than is not None and entry.kind != "trash" and now - entry.last_used <= older_than:
            continue
        (out.removed if dry_run or remove(entry) else out.locked).append(entry)
    return out


def evict(root: str | os.PathLike[str], max_size: int, what: Iterable[str] | None = None,
          dry_run: bool = False) -> Outcome:
    """Remove least recently used entries until the cache holds at most ``max_size`` bytes.

    Trash goes first; locked entries are skipped (they still count toward the total).
    """
    found = entries(root, what)
    total = sum(e.size for e in found)
    out = Outcome([], [])
    for entry in sorted(found, key=lambda e: (e.kind != "trash", e.last_used)):
        if total <= max_size:
            break
        if dry_run or remove(entry):
            out.removed.append(entry)
            total -= entry.size
        else:
            out.locked.append(entry)
    return out
