"""Where a session's wall time goes: loading, quantizing, compiling, timed rounds, quality, LoRA.

Each phase is exclusive: the innermost phase running owns the clock (a pipeline load inside a
LoRA test counts as loading, the timed rounds inside it as timed rounds). Whatever no phase
claims (collection, imports, the harness's own tests, pytest itself) is ``rest``, so the
phases add up to the wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

NAMES = ("loading", "quantizing", "compiling", "timed_rounds", "quality", "lora", "other_tests", "rest")


class Phases:
    """Exclusive seconds per phase since the session started."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = clock()
        self._stack: list[str] = []
        self._since = self.started
        self._totals = dict.fromkeys(NAMES, 0.0)

    def _charge(self, now: float) -> None:
        if self._stack:
            self._totals[self._stack[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time inside the block to ``name`` (one of ``NAMES``), pausing the enclosing phase."""
        if name not in self._totals:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(NAMES)}")
        self._charge(self._clock())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(self._clock())
            self._stack.pop()

    def wall_seconds(self) -> float:
        return self._clock() - self.started

    def totals(self) -> dict[str, float]:
        """Seconds per phase, ``rest`` included, rounded to 0.1 s: they add up to ``wall_seconds``."""
        now = self._clock()
        totals = dict(self._totals)
        if self._stack:  # a phase still running (the summary is written inside a test's teardown)
            totals[self._stack[-1]] += now - self._since
        totals["rest"] = max(0.0, (now - self.started) - sum(v for k, v in totals.items() if k != "rest"))
        return {k: round(v, 1) for k, v in totals.items()}


def maybe(phases: Phases | None, name: str) -> contextlib.AbstractContextManager[None]:
    """``phases.phase(name)``, or nothing when no session keeps phases (a CLI command, a unit test)."""
    return phases.phase(name) if phases is not None else contextlib.nullcontext()
