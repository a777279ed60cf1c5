"""Writes that either happen completely or not at all.

Every file quantgate leaves behind (synthetic weights, manifests, goldens, reports) goes
through here: content is written to a temporary sibling and renamed into place, so an
interrupted run leaves the previous version, never half of a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks; Windows runners simply run without the cross-process lock.
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_full(path: Path, exc: OSError) -> OSError:
    """``exc`` as a DiskFull naming ``path``, the space left there and how to free some, if it is
    ENOSPC (the data already in place is untouched: the write went to a temporary name)."""
    import errno

    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    from quantgate.errors import DiskFull

    where = path.parent if path.parent.exists() else Path(".")
    free = shutil.disk_usage(where).free
    return DiskFull(exc.errno, f"{path}: the disk is full ({free / 2**30:.2f} GiB free on the filesystem of "
                    f"{where}); nothing already there was changed. Free space with `quantgate cache list` and "
                    f"`quantgate cache clear --max-size SIZE`, or point QUANTGATE_CACHE_DIR / "
                    f"--quantgate-cache-dir at a larger disk")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that needs a file name (safetensors'
    ``save_file``, PIL); on success it is renamed to ``path``, on any exception removed.

    Large tensors go straight to disk this way instead of through an in-memory bytes copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and (full := _disk_full(path, exc)) is not exc:
            raise full from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a directory so that no half-deleted copy is ever visible under its name.

    The directory is renamed to a hidden sibling first, then deleted.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the kernel, libc or filesystem cannot (then nothing was changed).
    """
    import ctypes
    import ctypes.util
    import errno

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temporary name and put it in place of ``final`` on success.

    On an exception the temporary directory is removed and ``final`` is untouched. An
    existing ``final`` (the caller decided it was stale or corrupt) is replaced so that its
    name always holds one complete directory, the old or the new: the two are exchanged in one
    step where Linux can (``renameat2``); elsewhere the old one is moved aside first and moved
    back if the new one's rename is interrupted, which leaves a window of one rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a cache is often shared by a runner's users
    try:
        yield tmp
        _fsync_dir(tmp)
        if final.is_dir() and not final.is_symlink():
            if exchange(tmp, final):  # tmp now holds the old directory; the except below removes it too
                _fsync_dir(final.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(aside, final)
                raise
            _fsync_dir(final.parent)
            shutil.rmtree(aside, ignore_errors=True)
            return
        if final.exists() or final.is_symlink():
            remove_tree(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and (full := _disk_full(final, exc)) is not exc:
            raise full from exc
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block.

    Keeps two processes (for example two pytest-xdist workers) from materializing the same
    cache entry at once. Where the lock file cannot be created (a read-only filesystem, a
    shared cache another user owns) the block runs unlocked: this process can only read that
    cache, and readers of complete entries need no lock; a write there fails on its own, naming
    the file.
    """
    import errno

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - closed below, after the unlock
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise
    with fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
