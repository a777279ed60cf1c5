"""``--quantgate-cache-max-size SIZE``: keep the disk cache bounded on a runner (loaded by ``quantgate.plugin``).

At the end of the session, least recently used cache entries are evicted until the cache
holds at most SIZE (``quantgate.cache.evict``: entries another run holds locked are kept,
and this session's entries were just used, so they go last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quantgate.units import format_size, parse_size

_MAX_SIZE = pytest.StashKey[int | None]()
_EVICTED = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    help_text = "at the end of the session, evict least recently used cache entries down to SIZE (e.g. 50GiB)"
    parser.getgroup("quantgate").addoption("--quantgate-cache-max-size", dest="quantgate_cache_max_size",
                                           default=None, metavar="SIZE", help=help_text)
    parser.addini("quantgate_cache_max_size", help_text, default=None)


def pytest_configure(config: pytest.Config) -> None:
    from quantgate import options

    raw = options.value(config, "cache-max-size")  # the command line, the ini file, then the plan
    try:
        config.stash[_MAX_SIZE] = parse_size(raw) if raw else None
    except ValueError as exc:
        raise pytest.UsageError(f"--quantgate-cache-max-size: {exc}") from None


@pytest.hookimpl(trylast=True)  # after quantgate.plugin released the last pipeline
def pytest_sessionfinish(session: pytest.Session) -> None:
    max_size = session.config.stash.get(_MAX_SIZE, None)
    run = session.config.pluginmanager.get_plugin("quantgate-run")
    if max_size is None or run is None:
        return
    from quantgate.cache import evict

    session.config.stash[_EVICTED] = (Path(run.ctx.cache_dir), evict(run.ctx.cache_dir, max_size))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    done = config.stash.get(_EVICTED, None)
    if done is None:
        return
    root, outcome = done
    terminalreporter.write_line(f"quantgate cache: evicted {len(outcome.removed)} entries "
                                f"({format_size(outcome.freed)}) from {root}; {len(outcome.locked)} kept because "
                                f"another run holds them")
