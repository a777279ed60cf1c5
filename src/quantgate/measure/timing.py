"""Timing through pytest-benchmark, with the GPU synchronized around every round."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from quantgate.measure.memory import synchronize
from quantgate.measure.stats import ci_halfwidth_fraction, median_ci95

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


@dataclass(frozen=True)
class RoundPolicy:
    """How many timed rounds a benchmark takes: at least ``min_rounds``, then more until the
    median's 95% confidence interval is within ``ci_target`` of it (relative half-width), the
    timed rounds have taken ``budget_s`` seconds, or ``max_rounds`` were taken."""

    min_rounds: int
    max_rounds: int
    ci_target: float = 0.01
    budget_s: float = 0.0  # 0: exactly min_rounds

    @property
    def adaptive(self) -> bool:
        return self.budget_s > 0 and self.max_rounds > self.min_rounds


def extend_rounds(benchmark: Any, fn: Callable[[], Any], device: str, policy: RoundPolicy) -> dict[str, Any]:
    """After ``pedantic``: time further rounds of ``fn`` into the same pytest-benchmark statistics
    until ``policy`` is met; return what decided it and the median's interval.

    pytest-benchmark's ``pedantic`` takes a fixed number of rounds, so the extra rounds are timed
    here exactly as it times one: its timer read around one synchronized call, the duration
    appended to its ``Stats`` (whose summary figures are computed when first read, after this).
    The interval is checked after every round (a sequential rule; the order-statistic
    interval keeps at least its nominal coverage for a fixed count, a little less when stopped
    on it, which the 1% target dwarfs in practice).
    """
    meta = getattr(benchmark, "stats", None)
    data = getattr(getattr(meta, "stats", None), "data", None)
    out: dict[str, Any] = {"ci_target": policy.ci_target, "round_budget_s": policy.budget_s}
    if data is None:  # --benchmark-disable: nothing was timed
        out.update(median_ci95=None, ci95_halfwidth_fraction=None, rounds_stopped_by="benchmark disabled")
        return out
    timer = getattr(benchmark, "_timer", None) or time.perf_counter
    run = synchronized(fn, device)
    stopped = "min_rounds"
    if policy.adaptive:
        while True:
            width = ci_halfwidth_fraction(data)
            if width is not None and width <= policy.ci_target:
                stopped = "ci_target"
                break
            if len(data) >= policy.max_rounds:
                stopped = "max_rounds"
                break
            if sum(data) + statistics.median(data) > policy.budget_s:
                stopped = "budget"
                break
            start = timer()
            run()
            meta.stats.update(timer() - start)
    interval = median_ci95(data)
    out.update(median_ci95=None if interval is None else [interval[0], interval[1]],
               ci95_halfwidth_fraction=ci_halfwidth_fraction(data), rounds_stopped_by=stopped,
               round_seconds=[round(d, 7) for d in data])
    return out


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


class EventClock:
    """``fn``, also timed with CUDA events: the very calls pytest-benchmark's clock times.

    Both clocks then see the same rounds in the same warm state. The events span the call's
    GPU work from its first kernel to its last; the suite's clock (the host) also covers the
    launch of the first kernel and the return of the synchronize. The first ``skip`` calls
    (warm-up rounds) are not kept. Off CUDA nothing is recorded.
    """

    def __init__(self, fn: Callable[[], T], device: str, skip: int = 0):
        self.fn, self.device, self.skip = fn, device, skip
        self.calls = 0
        self._pairs: list[Any] = []

    def __call__(self) -> T:
        self.calls += 1
        if not str(self.device).startswith("cuda") or self.calls <= self.skip:
            return self.fn()
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = self.fn()
        end.record()
        self._pairs.append((start, end))
        return result

    def seconds(self) -> list[float]:
        """Seconds per kept call (after the caller synchronized)."""
        return [start.elapsed_time(end) / 1e3 for start, end in self._pairs]


def gpu_busy_seconds(fn: Callable[[], Any], device: str) -> tuple[float, float] | None:
    """(seconds the GPU spent running kernels and copies, wall seconds) for one call of ``fn``.

    Read with torch's profiler (CUPTI, device activity only): the union of the call's kernel
    and copy intervals. A path whose GPU is busy for only part of its wall time is bound by
    the host launching its kernels, not by the GPU. None off CUDA or where the profiler fails.
    """
    if not str(device).startswith("cuda"):
        return None
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            fn()
            synchronize(device)
            wall = time.perf_counter() - start
        intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    except Exception:  # noqa: BLE001 - a profiler that cannot start leaves the figure unknown, not the test failed
        return None
    busy, current_start, current_end = 0.0, None, None
    for begin, finish in intervals:
        if current_end is None or begin > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = begin, finish
        else:
            current_end = max(current_end, finish)
    if current_end is not None:
        busy += current_end - current_start
    return busy / 1e6, wall


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
            self.start = compiled_graphs()
        self.calls += 1
        try:
            return self.fn()
        finally:
            if self.start is not None:
                self.count = compiled_graphs() - self.start


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (its ``unique_graphs`` counter)."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
