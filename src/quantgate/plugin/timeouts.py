"""A per-case time budget, so one hung kernel cannot block a runner forever (loaded by ``quantgate.plugin``).

``--quantgate-case-timeout SECONDS`` (ini ``quantgate_case_timeout``; default 7200, 0 turns it
off) bounds each test: setup (the pipeline load, calibration included), call and teardown.

- Soft limit, at the budget: SIGALRM fails the test where it stands ("exceeded its N s
  budget"); the session goes on with the next test. This works wherever the main thread
  runs Python bytecode again: a slow loop, ``time.sleep``, a synchronize that returns.
- Hard limit, at budget + grace (``--quantgate-timeout-grace``, default 60 s): code that
  never returns to Python (a hung CUDA kernel inside a C call, a masked signal) never sees
  the soft limit. A watchdog thread then writes what the session has so far (the quantgate
  section of the JSON and the finished benchmarks, with the hung test marked) to
  ``--quantgate-partial-results`` (default ``<benchmark-json>.partial.json``, else
  ``quantgate-partial.json``), prints the stacks of every thread and ends the process with
  ``os._exit(1)``. Under pytest-xdist the controller reports the dead worker against that
  test and the other workers go on.
- Last resort, at budget + 2 x grace: where the hang holds the GIL, no Python thread runs at
  all; ``faulthandler.dump_traceback_later(exit=True)`` (a C thread) dumps stacks and exits.

Why not pytest-timeout: its ``signal`` method is the soft limit alone (a kernel that never
returns to Python keeps the runner forever), and its ``thread`` method ``os._exit``s at the
limit without letting the session write anything; it has one method per test, not both.
Where pytest-timeout is active it owns SIGALRM, and quantgate keeps only the watchdog.
Under ``--pdb`` / ``--trace`` the budget is off (a person is debugging).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from quantgate.plugin.options import number

DEFAULT_BUDGET_S = 7200.0  # generous: the longest legitimate step (a FLUX.1-dev calibration) is under an hour
DEFAULT_GRACE_S = 60.0

_STATE = pytest.StashKey["Budget"]()

_OPTIONS = {
    "case-timeout": ("time budget of each test in seconds (setup with the pipeline load, call, teardown); "
                     f"0 turns it off (default: {DEFAULT_BUDGET_S:g})"),
    "timeout-grace": ("seconds past the budget before a test that does not return to Python is killed with "
                      f"the process, after writing partial results (default: {DEFAULT_GRACE_S:g})"),
    "partial-results": ("where a killed run writes its partial results (default: <benchmark-json>.partial.json, "
                        "else quantgate-partial.json in the working directory)"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantgate")
    for name, help_text in _OPTIONS.items():
        dest = f"quantgate_{name.replace('-', '_')}"
        group.addoption(f"--quantgate-{name}", dest=dest, default=None, metavar="SECONDS" if "partial" not in name
                        else "PATH", help=help_text)
        parser.addini(dest, help_text, default=None)


def _value(config: pytest.Config, name: str) -> str | None:
    from quantgate import options

    return options.value(config, name)


def _seconds(config: pytest.Config, name: str, default: float) -> float:
    seconds = number(_value(config, name), name, float, "a number of seconds", 0)
    if seconds is None:
        return default
    return seconds


def _faulthandler_timeout(config: pytest.Config) -> float:
    try:
        return float(config.getini("faulthandler_timeout") or 0)
    except ValueError:  # -p no:faulthandler: the ini key is not registered
        return 0.0


def partial_path(config: pytest.Config, worker: str | None = None) -> Path:
    """Where a process killed by the hard limit writes its partial results (one file per xdist worker)."""
    given = _value(config, "partial-results")
    if given:
        path = Path(given)
    else:
        from quantgate.plugin.benchmark_files import benchmark_json_path

        bench_json = benchmark_json_path(config.getoption("benchmark_json", None))  # 5.2: an open file
        path = Path(f"{bench_json}.partial.json") if bench_json else Path("quantgate-partial.json")
    worker = worker or os.environ.get("PYTEST_XDIST_WORKER")
    return path.with_name(f"{path.stem}-{worker}{path.suffix}") if worker else path


class Watchdog:
    """One daemon thread that calls ``on_expire(nodeid, elapsed)`` when an armed deadline passes."""

    def __init__(self, on_expire: Callable[[str, float], None]):
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._started_at = 0.0
        self._nodeid = ""
        self._stopped = False
        self._thread: threading.Thread | None = None

    def arm(self, nodeid: str, seconds: float) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="quantgate-watchdog", daemon=True)
                self._thread.start()
            self._started_at = time.monotonic()
            self._deadline, self._nodeid = self._started_at + seconds, nodeid
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def stop(self) -> None:
        """End the thread (at the end of the session)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while True:
                if self._stopped:
                    return
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            nodeid, elapsed = self._nodeid, time.monotonic() - self._started_at
        self._on_expire(nodeid, elapsed)


class Budget:
    """The session's budget: arms the soft alarm and the watchdog around each test."""

    def __init__(self, config: pytest.Config, budget: float, grace: float):
        self.config, self.budget, self.grace = config, budget, grace
        self.partial_path = partial_path(config)
        # pytest-timeout, when present, owns SIGALRM; keep only the watchdog then.
        self.soft = not config.pluginmanager.hasplugin("timeout")
        # faulthandler's timer is one per process; pytest's faulthandler_timeout may use it.
        self.last_resort = not _faulthandler_timeout(config)
        self.stderr_fd = os.dup(sys.__stderr__.fileno())  # the terminal's, before any test captures fd 2
        self.watchdog = Watchdog(self._hard_limit)
        # What a benchmark JSON's machine_info holds, taken in the main thread before the first
        # test: the watchdog cannot ask a hung CUDA for it, and without it a partial file cannot
        # be merged with the session's other files (quantgate report refuses mixed machines).
        self.machine_info: dict[str, Any] | None = None

    def close(self) -> None:
        self.watchdog.stop()
        os.close(self.stderr_fd)

    # -- soft limit: SIGALRM in the main thread ------------------------------------------

    @staticmethod
    def _can_signal() -> bool:
        return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def _on_alarm(self, item: pytest.Item) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            _record(self.config, item.nodeid, "soft", self.budget, self.grace, self.budget)
            pytest.fail(f"{item.nodeid} exceeded its {self.budget:g} s budget (--quantgate-case-timeout); "
                        "stopped where it stood (the traceback shows where)")
        return handler

    def protect(self, item: pytest.Item) -> Callable[[], None]:
        """Arm the limits for ``item``; returns the function that disarms them."""
        if self.machine_info is None:
            self.machine_info = _machine_info()
        self.watchdog.arm(item.nodeid, self.budget + self.grace)
        if self.last_resort:
            faulthandler.dump_traceback_later(self.budget + 2 * self.grace, exit=True, file=self.stderr_fd)
        previous_handler, previous_timer, start = None, (0.0, 0.0), time.monotonic()
        soft = self.soft and self._can_signal()
        if soft:
            previous_handler = signal.signal(signal.SIGALRM, self._on_alarm(item))
            previous_timer = signal.setitimer(signal.ITIMER_REAL, self.budget)

        def disarm() -> None:
            if soft:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous_handler)
                if previous_timer[0] > 0:  # an enclosing session's budget (pytester in-process) goes on
                    signal.setitimer(signal.ITIMER_REAL, max(previous_timer[0] - (time.monotonic() - start), 1e-3))
            if self.last_resort:
                faulthandler.cancel_dump_traceback_later()
            self.watchdog.disarm()

        return disarm

    # -- hard limit: the watchdog thread ------------------------------------------------

    def _hard_limit(self, nodeid: str, elapsed: float) -> None:
        message = (f"{nodeid} exceeded its {self.budget:g} s budget + {self.grace:g} s grace without returning "
                   f"to Python (a hung kernel or a blocking C call); killed after {elapsed:.1f} s")
        try:
            _record(self.config, nodeid, "hard", self.budget, self.grace, elapsed)
            written = write_partial(self.config, self.partial_path, nodeid, message, self.machine_info)
            note = f"; partial results in {written}"
        except Exception as exc:  # still free the runner
            note = f"; writing partial results failed: {type(exc).__name__}: {exc}"
        os.write(self.stderr_fd, f"\nquantgate: {message}{note}; stacks follow, then exit 1\n".encode())
        faulthandler.dump_traceback(file=self.stderr_fd, all_threads=True)
        os._exit(1)


def _record(config: pytest.Config, nodeid: str, kind: str, budget: float, grace: float, elapsed: float) -> None:
    """Mark ``nodeid`` in the session's quantgate records (JSON, terminal summary, report)."""
    run = config.pluginmanager.get_plugin("quantgate-run")
    if run is None:
        return
    attrs = run.case_attrs.get(nodeid, {})
    run.timeouts.append({"nodeid": nodeid, "case": attrs.get("case"), "kind": kind, "budget_s": budget,
                         "grace_s": grace, "elapsed_s": round(elapsed, 3)})
    if kind == "hard":  # no report will come for it: the process ends
        record = run.outcomes.setdefault(nodeid, {"duration_s": round(elapsed, 3), **attrs})
        record.update(outcome="failed", when="killed",
                      reason=f"hung: exceeded its {budget:g} s budget + {grace:g} s grace; the process was killed")


def _host() -> dict[str, Any]:
    return {"node": os.uname().nodename, "python_version": sys.version.split()[0]}


def _machine_info() -> dict[str, Any]:
    base = _host()
    try:
        from quantgate.hardware import machine_facts

        return {**base, **machine_facts()}
    except Exception as exc:  # the budget must not depend on it
        return {**base, "machine_facts_error": f"{type(exc).__name__}: {exc}"}


def write_partial(config: pytest.Config, path: Path, nodeid: str, message: str,
                  machine_info: dict[str, Any] | None = None) -> Path:
    """Write what the session has so far as a benchmark JSON (quantgate section and finished
    benchmarks, readable by ``quantgate report``), naming the hung test. ``machine_info``: as
    quantgate fills a benchmark JSON's (taken before the hang), so the file merges with others."""
    from quantgate import __version__
    from quantgate.atomic import atomic_write_text

    run = config.pluginmanager.get_plugin("quantgate-run")
    session = getattr(config, "_benchmarksession", None)
    benchmarks = []
    for bench in getattr(session, "benchmarks", []):
        if bench:  # only benchmarks that finished their rounds have stats
            benchmarks.append(bench.as_dict(include_data=False))
    data = {
        "machine_info": machine_info or _host(),
        "commit_info": {"id": os.environ.get("QUANTGATE_COMMIT", "unknown")},
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": __version__,
        "benchmarks": benchmarks,
        "quantgate": {**(run.summary() if run is not None else {}),
                      "partial": {"hung_test": nodeid, "message": message, "pid": os.getpid()}},
    }
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# -- hooks ----------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    budget = _seconds(config, "case-timeout", DEFAULT_BUDGET_S)
    grace = _seconds(config, "timeout-grace", DEFAULT_GRACE_S)
    if budget > 0 and not (config.getoption("usepdb", False) or config.getoption("trace", False)):
        config.stash[_STATE] = Budget(config, budget, grace)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    state = item.config.stash.get(_STATE, None)
    if state is None:
        return (yield)
    disarm = state.protect(item)
    try:
        return (yield)
    finally:
        disarm()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.pluginmanager.get_plugin("quantgate-run")
    if run is None or not run.timeouts:
        return
    terminalreporter.section("quantgate timeouts")
    for t in run.timeouts:
        terminalreporter.write_line(f"  TIMEOUT {t['nodeid']}: over its {t['budget_s']:g} s budget "
                                    f"(stopped after {t['elapsed_s']:g} s)")
