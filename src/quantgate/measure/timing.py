"""Timing through pytest-benchmark, with the GPU synchronized around every round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from quantgate.measure.memory import synchronize

T = TypeVar("T")


def synchronized(fn: Callable[[], T], device: str) -> Callable[[], T]:
    """``fn`` followed by a device synchronize, so a round's time includes its GPU work."""

    def run() -> T:
        result = fn()
        synchronize(device)
        return result

    return run


def pedantic(benchmark: Any, fn: Callable[[], T], device: str, *, rounds: int, warmup_rounds: int) -> T:
    """Time ``fn`` with ``benchmark.pedantic`` (warm-up rounds first, one call per round).

    Returns the result of the last call. pytest-benchmark owns statistics and storage.
    """
    synchronize(device)  # queued work from setup must not land in the first round
    return benchmark.pedantic(synchronized(fn, device), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def cuda_event_times(fn: Callable[[], Any], device: str, *, rounds: int, warmup_rounds: int) -> list[float]:
    """Seconds per call of ``fn`` measured with CUDA events (a bare loop, no pytest-benchmark).

    The independent clock the suite's own timings are checked against.
    """
    import torch

    for _ in range(warmup_rounds):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


class CompilesInTimedRounds:
    """``fn``, counting the graphs torch.compile builds from the first timed round on.

    A compile variant compiles in its first call and, at the latest, in the warm-up; a graph
    built during a timed round means a guard failed again (a recompile), and that round timed
    the compiler rather than the model.
    """

    def __init__(self, fn: Callable[[], T], warmup_rounds: int):
        self.fn, self.warmup_rounds, self.calls = fn, warmup_rounds, 0
        self.start: int | None = None
        self.count = 0

    def __call__(self) -> T:
        if self.calls == self.warmup_rounds:
            self.start = _compiled_graphs()
        self.calls += 1
        try:
            return self.fn()
        finally:
            if self.start is not None:
                self.count = _compiled_graphs() - self.start


def _compiled_graphs() -> int:
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
