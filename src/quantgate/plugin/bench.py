"""``Bench``: one timed scope of one case through pytest-benchmark, and what its record holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from quantgate import __version__
from quantgate.cases import Case
from quantgate.measure import gpu_state
from quantgate.measure.memory import synchronize, track_peak
from quantgate.measure.stages import time_stages
from quantgate.measure.timing import (
    CompilesInTimedRounds,
    EventClock,
    RoundPolicy,
    compiled_graphs,
    extend_rounds,
    gpu_busy_seconds,
    pedantic,
)
from quantgate.pipeline import LoadedPipeline
from quantgate.plugin.session import QuantgateRun
from quantgate.records import Measurement

T = TypeVar("T")


class Bench:
    """Times a callable for one case and records what a reader of the JSON needs."""

    def __init__(self, benchmark: Any, case: Case, loaded: LoadedPipeline, run: QuantgateRun):
        self.compiles_in_timed_rounds = 0  # set by each call
        self.benchmark, self.case, self.loaded, self.run = benchmark, case, loaded, run
        self.rounds = run.cpu_rounds if case.device == "cpu" else run.rounds

    def __call__(self, scope: str, fn: Callable[[], T], flops_scope: str | None = None) -> T:
        """Time ``fn`` (``scope``: ``transformer`` or ``end_to_end``); return its last result.

        A first call runs outside the statistics and is reported on its own (for a compile
        variant it is the compilation); then warm-up rounds, then the timed rounds, each
        followed by a device synchronize. A scope of another name (``transformer_lora``)
        names which FLOPs it performs with ``flops_scope``.
        """
        case, run = self.case, self.run
        self.benchmark.group = f"{case.model}/{case.source}/{scope}/b{case.batch}/{case.device}"
        breaks_before, graphs_before = _graph_breaks(), compiled_graphs()
        start = time.perf_counter()
        with run.phases.phase("compiling" if case.variant == "compile" else "timed_rounds"):
            fn()
            synchronize(case.device)
        first_call = time.perf_counter() - start
        graphs_in_first_call = compiled_graphs() - graphs_before
        events = EventClock(fn, case.device, skip=run.warmup_rounds)
        compiles = CompilesInTimedRounds(events, warmup_rounds=run.warmup_rounds)
        state_before = gpu_state.read(case.device)
        policy = run.round_policy if case.device != "cpu" else RoundPolicy(self.rounds, self.rounds)
        with track_peak(case.device) as peak, run.phases.phase("timed_rounds"):
            result = pedantic(self.benchmark, compiles, case.device, rounds=self.rounds,
                              warmup_rounds=run.warmup_rounds)
            # More rounds of the same wrapper: CUDA events and compile counts cover them too.
            spread = extend_rounds(self.benchmark, compiles, case.device, policy)
        state = gpu_state.around(state_before, gpu_state.read(case.device))
        busy = gpu_busy_seconds(fn, case.device) if scope.startswith("transformer") else None
        stages = None
        if scope == "end_to_end":  # one more call, untimed, with its stages bracketed
            with run.phases.phase("timed_rounds"):
                stages = time_stages(self.loaded.diffusers_pipeline, self.loaded.denoiser, case.device, fn)
        self.compiles_in_timed_rounds = compiles.count
        stats = self.benchmark.stats.stats if self.benchmark.stats is not None else None
        clocks = _clock_agreement(stats, events.seconds(), busy)
        flops = self.loaded.flops(case, flops_scope or scope)
        peak_tflops = run.bf16_peak_tflops(case.device)
        achieved = flops / stats.median / 1e12 if stats is not None and stats.median > 0 else None
        loaded = self.loaded.describe()
        self.benchmark.extra_info.update({
            "quantgate_version": __version__,
            "scope": scope,
            **case.as_dict(),
            "hardware": run.hardware(case),
            "device_name": run.device(case.device).name,
            "rounds": len(spread.get("round_seconds") or ()) or self.rounds,
            "min_rounds": self.rounds,
            "warmup_rounds": run.warmup_rounds,
            **spread,
            "first_call_seconds": round(first_call, 4),
            # Graphs dynamo compiled in the first call: 0 for an eager path, or for a compiled one
            # whose graphs an earlier test of the session compiled (its first call is then short).
            "dynamo_graphs_in_first_call": graphs_in_first_call,
            "dynamo_graph_breaks": _graph_breaks() - breaks_before,
            "dynamo_compiles_in_timed_rounds": compiles.count,
            "denoiser_flops_per_call": flops,
            "achieved_tflops": None if achieved is None else round(achieved, 2),
            "bf16_peak_tflops_measured": None if peak_tflops is None else round(peak_tflops, 1),
            "fraction_of_bf16_peak": None if achieved is None or not peak_tflops else round(achieved / peak_tflops, 4),
            "denoiser_footprint_bytes": self.loaded.denoiser_footprint.total_bytes,
            "pipeline_footprint_bytes": loaded["pipeline_footprint_bytes"],
            **{k: v for k, v in peak.as_dict().items() if k != "measured"},
            "peak_memory_measured": peak.peak_allocated is not None,
            **clocks,
            "gpu_state": state,
            "stages": stages,
            "pipeline": loaded,
        })
        if stats is not None:
            run.records.add(Measurement(case, scope, stats.median, {k: getattr(stats, k) for k in
                                        ("min", "max", "mean", "median", "iqr", "stddev")}, peak.peak_allocated,
                                        clocks, rounds=tuple(stats.data)))
        return result


# A path whose GPU runs kernels for less than this share of its wall time is bound by the host
# launching them (eager dynamic quantization: many small kernels), not by the GPU.
LAUNCH_BOUND_BELOW = 0.8


def _clock_agreement(stats: Any, event_seconds: list[float], busy: tuple[float, float] | None) -> dict[str, Any]:
    """The suite's clock against CUDA events over the same rounds, and how busy the GPU was."""
    import statistics

    out: dict[str, Any] = {"cuda_event_median_s": None, "timing_disagreement_vs_cuda_events": None,
                           "gpu_busy_fraction": None, "launch_bound": None}
    if stats is not None and event_seconds:
        events = statistics.median(event_seconds)
        out["cuda_event_median_s"] = events
        out["timing_disagreement_vs_cuda_events"] = abs(stats.median - events) / events if events > 0 else None
    # Busy time over the unprofiled median: the profiled call's own wall time carries the
    # profiler's per-launch overhead, which would make every path look launch bound.
    wall = stats.median if stats is not None and stats.median > 0 else (busy[1] if busy is not None else 0)
    if busy is not None and wall > 0:
        fraction = min(1.0, busy[0] / wall)
        out.update(gpu_busy_fraction=round(fraction, 4), launch_bound=fraction < LAUNCH_BOUND_BELOW,
                   gpu_busy_seconds=round(busy[0], 6), profiled_wall_seconds=round(busy[1], 6))
    return out


def _graph_breaks() -> int:
    import torch._dynamo.utils

    return sum(torch._dynamo.utils.counters["graph_break"].values())
