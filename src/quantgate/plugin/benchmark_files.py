"""pytest-benchmark's own JSON writes, made atomic.

pytest-benchmark 5 writes ``--benchmark-json PATH`` with ``open(PATH, "wb")`` (truncating the
previous file before the new one is complete) and ``--benchmark-save`` files the same way
under their final name. It has no hook for writing, so at session start quantgate replaces
the two writers of this session's ``BenchmarkSession`` with ones that serialize the same way
(pytest-benchmark's ``safe_dumps``) and rename into place through ``quantgate.atomic``.
Other storage backends (elasticsearch) are left alone.

A run that benchmarks nothing (every test skipped, or only memory and quality tests) gets a
``--benchmark-json`` too, through pytest-benchmark's own hooks with an empty ``benchmarks``
list: pytest-benchmark writes nothing then, which would leave the previous run's file in place
(5.3) or an empty one (5.2), and the gate verdicts, skips and outcomes recorded nowhere.

This is a plugin module (``quantgate.plugin``'s ``pytest_plugins``): other modules import it
inside functions, since importing it before pytest registers it makes pytest warn that it
cannot rewrite its asserts.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from quantgate.atomic import atomic_write_bytes


def _encode(output_json: dict[str, Any]) -> bytes:
    from pytest_benchmark.utils import safe_dumps

    return safe_dumps(output_json, ensure_ascii=True, indent=4).encode()


def benchmark_json_path(target: Any) -> str:
    """The path behind ``--benchmark-json``: pytest-benchmark 5.3 keeps the path, 5.2 an open file.

    5.2 opens (and empties) the file while parsing options (``argparse.FileType``); renaming a
    complete file over that name is still atomic for readers, the stale handle is never written.
    """
    return target.name if hasattr(target, "write") else target  # a Path has .name too: its last part


def _save_json(self: Any, output_json: dict[str, Any]) -> None:
    # 5.2 emptied the file at start-up, so it cannot keep the previous version; the new one
    # still lands whole. Renaming over the name leaves 5.2's handle unwritten: close it.
    path = benchmark_json_path(self.json)
    atomic_write_bytes(path, _encode(output_json))
    if hasattr(self.json, "close"):
        self.json.close()
    self.logger.info(f"Wrote benchmark data in: {path}", purple=True)


def _storage_save(self: Any, output_json: dict[str, Any], save: str) -> None:
    output_file = self.get(f"{self._next_num}_{save}.json")
    if output_file.exists():  # the check pytest-benchmark asserts; never overwrite a saved run
        raise FileExistsError(f"{output_file} exists; not overwriting a saved benchmark run")
    atomic_write_bytes(output_file, _encode(output_json))
    self.logger.info(f"Saved benchmark data in: {output_file}")


def _handle_saving(self: Any, original: Any) -> None:
    if self.benchmarks or not self.json or self.disabled:
        return original()
    machine_info = self.get_machine_info()
    hook = self.config.hook
    commit_info = hook.pytest_benchmark_generate_commit_info(config=self.config)
    hook.pytest_benchmark_update_commit_info(config=self.config, commit_info=commit_info)
    output_json = hook.pytest_benchmark_generate_json(config=self.config, benchmarks=[], include_data=True,
                                                      machine_info=machine_info, commit_info=commit_info)
    hook.pytest_benchmark_update_json(config=self.config, benchmarks=[], output_json=output_json)
    self.save_json(output_json)
    return None


def make_atomic(bs: Any) -> bool:
    """Route ``bs`` (a pytest-benchmark ``BenchmarkSession``) writes through atomic renames.

    Returns whether the JSON writer was replaced (False for an unknown pytest-benchmark).
    """
    if not callable(getattr(bs, "save_json", None)):
        return False
    bs.save_json = types.MethodType(_save_json, bs)
    if callable(getattr(bs, "handle_saving", None)):
        original = bs.handle_saving
        bs.handle_saving = types.MethodType(lambda self: _handle_saving(self, original), bs)
    try:
        from pytest_benchmark.storage.file import FileStorage
    except ImportError:  # pragma: no cover - a pytest-benchmark without file storage
        return True
    storage = getattr(bs, "storage", None)
    if isinstance(storage, FileStorage) and hasattr(type(storage), "_next_num"):
        storage.save = types.MethodType(_storage_save, storage)
    return True


# pytest-benchmark builds its session in a trylast pytest_configure; it writes at session finish.
def pytest_sessionstart(session: pytest.Session) -> None:
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        if bs.json and (problem := json_target_problem(benchmark_json_path(bs.json))):
            raise pytest.UsageError(f"--benchmark-json: {problem}")
        make_atomic(bs)


def json_target_problem(path: Any) -> str | None:
    """Why the results could not be written to ``path`` once every test ran, or None: checked
    before the first test, so a typo costs seconds, not the run."""
    import os
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        return f"{target} is a directory; give a file name, e.g. {target / 'out.json'}"
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return f"the directory {parent} does not exist; create it first (mkdir -p {parent})"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the directory {parent} is not writable; results are written beside {target.name} and renamed"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{target} is not writable"
    return None
