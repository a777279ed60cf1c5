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
