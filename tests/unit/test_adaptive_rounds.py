"""Adaptive rounds: more timed rounds until the median's interval is within its target, the
budget is spent or the most rounds were taken; each stop says which rule decided it."""

import itertools

import pytest

from quantgate.measure.timing import RoundPolicy, extend_rounds


class _Stats:
    def __init__(self, data):
        self.data = list(data)

    def update(self, duration):
        self.data.append(duration)


class _Benchmark:
    """What extend_rounds reads of pytest-benchmark's fixture after ``pedantic``: its timer and Stats."""

    def __init__(self, first_rounds, durations):
        self.stats = type("Metadata", (), {})()
        self.stats.stats = _Stats(first_rounds)
        durations = iter(durations)
        clock = itertools.count()
        self._now = 0.0
        self._ticks = clock

        def timer():
            # each call's duration is the next value; the timer reads twice per round
            if next(clock) % 2 == 0:
                return self._now
            self._now += next(durations)
            return self._now

        self._timer = timer


CASES = [
    # first rounds, later rounds, policy, stopped by, rounds taken
    ([1.0, 1.0, 1.0], [1.0] * 50, RoundPolicy(3, 30, 0.01, 60.0), "ci_target", 6),
    ([1.0, 1.3, 0.8], [0.7, 1.4] * 25, RoundPolicy(3, 12, 0.01, 60.0), "max_rounds", 12),
    ([1.0, 1.3, 0.8], [0.7, 1.4] * 25, RoundPolicy(3, 30, 0.01, 6.0), "budget", 5),
    ([1.0, 1.3, 0.8], [0.7, 1.4] * 25, RoundPolicy(3, 30, 0.01, 0.0), "min_rounds", 3),
]


@pytest.mark.parametrize("first, later, policy, stopped, taken", CASES)
def test_rounds_stop_by_the_first_rule_met(first, later, policy, stopped, taken):
    benchmark = _Benchmark(first, later)
    out = extend_rounds(benchmark, lambda: None, "cpu", policy)
    assert out["rounds_stopped_by"] == stopped
    assert len(benchmark.stats.stats.data) == taken
    assert out["round_seconds"] == pytest.approx(benchmark.stats.stats.data)
    if taken >= 6:
        low, high = out["median_ci95"]
        assert low <= sorted(benchmark.stats.stats.data)[taken // 2] <= high
    else:
        assert out["median_ci95"] is None and out["ci95_halfwidth_fraction"] is None


def test_every_extra_round_calls_the_timed_function_once():
    calls = []
    benchmark = _Benchmark([1.0, 1.3, 0.8], [0.7, 1.4] * 25)
    extend_rounds(benchmark, lambda: calls.append(1), "cpu", RoundPolicy(3, 9, 0.01, 60.0))
    assert len(calls) == 6


def test_a_disabled_benchmark_takes_no_rounds():
    class Disabled:
        stats = None

    out = extend_rounds(Disabled(), lambda: pytest.fail("called"), "cpu", RoundPolicy(3, 30, 0.01, 60.0))
    assert out["rounds_stopped_by"] == "benchmark disabled" and out["median_ci95"] is None
