"""Session phases are exclusive and add up to the wall time."""

from __future__ import annotations

import time

import pytest

from quantgate.phases import NAMES, Phases, maybe


class _Clock:
    """A perf_counter that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_the_innermost_phase_owns_the_clock_and_the_rest_is_rest() -> None:
    clock = _Clock()
    phases = Phases(clock.perf_counter)
    clock.now = 1.0
    with phases.phase("lora"):
        clock.now = 3.0
        with phases.phase("loading"):  # a reload inside a LoRA test counts as loading
            clock.now = 4.0
        clock.now = 10.0
    clock.now = 12.0
    with phases.phase("quality"):
        clock.now = 20.0
    assert phases.totals() == {**dict.fromkeys(NAMES, 0.0), "lora": 8.0, "loading": 1.0, "quality": 8.0,
                               "rest": 3.0}
    assert phases.wall_seconds() == 20.0


def test_a_phase_still_running_is_counted_up_to_now() -> None:
    phases = Phases()
    with phases.phase("timed_rounds"):
        time.sleep(0.05)
        totals = phases.totals()
    assert totals["timed_rounds"] >= 0.0 and sum(totals.values()) == pytest.approx(phases.wall_seconds(), abs=0.2)


def test_an_unknown_phase_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown phase 'warmup'; phases: loading, quantizing"), \
            Phases().phase("warmup"):
        pass


def test_without_a_session_phases_are_a_no_op() -> None:
    with maybe(None, "anything"):
        pass
