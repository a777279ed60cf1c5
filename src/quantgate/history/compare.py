"""Benchmark history across commits: per case, did the timing change, by a rank test of its rounds?

Inputs are pytest-benchmark JSON files written with the quantgate plugin: files given one by
one, or a pytest-benchmark storage directory (``--benchmark-autosave`` /
``--benchmark-storage``), read oldest to newest. The last run is compared with the one before
it (or with an explicit base), and each case's history feeds a trend plot.

Each timed case is decided from its raw rounds (pytest-benchmark's ``stats.data``, which
``--benchmark-json`` always writes and an autosave writes with ``--benchmark-save-data``; else
quantgate's ``extra_info.round_seconds``), as asv decides its regressions: a two-sided
Mann-Whitney U test of the two runs' rounds (exact null distribution for small samples without
ties, else the tie-corrected normal approximation: ``quantgate.measure.stats``) and the ratio of
medians new/base with its seeded bootstrap 95% interval. The verdict is

- "regression": p < alpha and the median slower by more than the tolerance, with the whole
  95% interval of the ratio beyond it (as the speedup gates pass on their interval's lower
  bound: a move the interval cannot tell from the tolerance decides nothing);
- "improvement": the same, faster;
- "host-bound": a regression or improvement of a launch-bound path (``launch_bound`` on either
  side) whose GPU work (``gpu_busy_seconds``) moved within the tolerance: the host launching
  the kernels changed, not what the GPU did. It does not fail the comparison unless
  ``judge_host_bound`` (``--judge-host-bound``, for a quiet dedicated runner) is set;
- "no change": otherwise (the runs cannot be told apart, or they can and the move is within
  the tolerance);
- "not enough data": too few rounds for the test to reach alpha whatever the timings. With m
  and n rounds the smallest two-sided p is 2 / C(m + n, m): 3 and 3 rounds give at best
  p = 0.1, so at alpha 0.05 they can never show a change.

Its ``decided_by`` gives the p-value, the method and the ratio with its interval, e.g.
"Mann-Whitney p=0.0012 (exact), new/base 1.083 [1.061, 1.104]". alpha, the tolerance and the
memory tolerance are data (``fixtures/compare.toml``, shipped as ``quantgate/data/compare.toml``);
the command's flags override them. Memory (footprint, peak) and quality figures are compared
too: they are not noisy, so only their tolerance applies.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError, QuantgateError
from quantgate.gates import METRICS
from quantgate.measure.stats import RankTest, mann_whitney, ratio_ci95
from quantgate.results import Result, RunSet, load_runs
from quantgate.tomlfiles import read_toml

# extra_info fields compared besides time: name -> (label, +1 if higher is better else -1)
FIGURES: dict[str, tuple[str, int]] = {
    "denoiser_footprint_bytes": ("transformer footprint", -1),
    "peak_allocated_bytes": ("peak allocated", -1),
}
# Gate metrics derived from timings (speedups, overheads, the GPU's busy share) are noisy; their
# inputs are compared as times instead, with the rank test.
_TIME_DERIVED = ("speedup", "timing", "overhead", "gpu_busy")
# machine_info fields whose difference the comparison lists (libraries: each of machine_info's
# "libraries", torch, diffusers, torchao...; cpu: its brand). Only hardware_class refuses.
MACHINE_KEYS = ("gpu", "hardware_class", "nvidia_driver", "cuda_runtime", "cpu", "python_version", "quantgate")

REGRESSION, IMPROVEMENT, NO_CHANGE, NOT_ENOUGH_DATA = "regression", "improvement", "no change", "not enough data"
HOST_BOUND = "host-bound"
VERDICTS = (REGRESSION, IMPROVEMENT, HOST_BOUND, NOT_ENOUGH_DATA, NO_CHANGE)  # the order a reader wants them in
THRESHOLDS_FILE = "compare.toml"


@dataclass(frozen=True)
class Thresholds:
    """When a change counts (``fixtures/compare.toml``'s ``[compare]`` table)."""

    alpha: float  # significance level of the rank test
    tolerance: float  # smallest relative move of a median that counts
    memory_tolerance: float  # the same for memory and quality figures
    path: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise QuantgateError(f"alpha must be between 0 and 1 (exclusive), not {self.alpha:g}")
        for name in ("tolerance", "memory_tolerance"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise QuantgateError(f"the {name.replace('_', ' ')} must be a finite fraction >= 0, not "
                                     f"{getattr(self, name):g}")

    def but(self, **overrides: float | None) -> Thresholds:
        """These thresholds with the given ones replaced (None keeps the file's)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def shipped_thresholds() -> Path:
    """The thresholds file shipped in the package (in a checkout, a link to fixtures/compare.toml)."""
    return Path(str(resources.files("quantgate") / "data" / THRESHOLDS_FILE))


def load_thresholds(path: str | Path | None = None, option: str = "--thresholds") -> Thresholds:
    """Read and check a thresholds file (default: the shipped one); ConfigFileError names the key."""
    path = Path(path) if path is not None else shipped_thresholds()
    data, text = read_toml(path, "thresholds file", f"thresholds file not found (pass {option} FILE)")
    lines = text.splitlines()

    def line(key: str) -> int | None:
        return next((i + 1 for i, t in enumerate(lines) if t.strip().startswith(key)), None)

    unknown = sorted(set(data) - {"compare"})
    if unknown:
        raise ConfigFileError(path, f"unknown table {unknown[0]!r}; the thresholds are a [compare] table",
                              line=line(f"[{unknown[0]}") or line(unknown[0]), key=unknown[0])
    table = data.get("compare")
    if not isinstance(table, dict):
        raise ConfigFileError(path, "no [compare] table (alpha, tolerance, memory_tolerance)", key="compare")
    fields = ("alpha", "tolerance", "memory_tolerance")
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigFileError(path, f"unknown key {unknown[0]!r}; [compare] takes {', '.join(fields)}",
                              line=line(unknown[0]), key=unknown[0])
    values = {}
    for key in fields:
        value = table.get(key)
        if value is None:
            raise ConfigFileError(path, f"[compare] needs {key}", key=key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigFileError(path, f"{key} must be a finite number >= 0, not {value!r}", line=line(key), key=key)
        values[key] = float(value)
    if not 0 < values["alpha"] < 1:
        raise ConfigFileError(path, f"alpha must be between 0 and 1, not {values['alpha']!r}", line=line("alpha"),
                              key="alpha")
    return Thresholds(**values, path=str(path))


@dataclass
class TimeChange:
    """How one case's median moved between two runs, and why that is or is not a regression."""

    key: tuple[str, str]
    base: Result
    new: Result
    verdict: str  # one of VERDICTS
    decided_by: str
    test: RankTest | None = None  # None: not enough data
    ratio: float | None = None  # median of the new rounds / median of the base rounds
    interval: tuple[float, float] | None = None  # its bootstrap 95% interval

    @property
    def relative(self) -> float:
        return (self.new.median - self.base.median) / self.base.median

    @property
    def rounds(self) -> tuple[int, int]:
        return len(self.base.round_times), len(self.new.round_times)


@dataclass
class FigureChange:
    key: tuple[str, str]
    figure: str
    base: float
    new: float
    verdict: str
    decided_by: str


@dataclass
class Comparison:
    base_label: str
    new_label: str
    times: list[TimeChange] = field(default_factory=list)
    figures: list[FigureChange] = field(default_factory=list)
    machine_differences: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_new: list[str] = field(default_factory=list)
    thresholds: Thresholds | None = None

    @property
    def regressions(self) -> list[TimeChange | FigureChange]:
        return [c for c in [*self.times, *self.figures] if c.verdict == REGRESSION]

    @property
    def undecided(self) -> list[TimeChange]:
        return [c for c in self.times if c.verdict == NOT_ENOUGH_DATA]


def _index(runs: RunSet) -> dict[tuple[str, str], Result]:
    indexed: dict[tuple[str, str], Result] = {}
    for r in runs.results:
        indexed.setdefault((r.case_id, r.scope), r)  # merged files: the first part's measurement
    return indexed


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def smallest_p(m: int, n: int) -> float:
    """The smallest two-sided p-value a Mann-Whitney test of m and n rounds can give."""
    return min(1.0, 2 / math.comb(m + n, m)) if m and n else 1.0


def rounds_needed(alpha: float) -> int:
    """The fewest rounds per run (the same in both) with which the test can reach ``alpha``."""
    return next(k for k in range(1, 200) if smallest_p(k, k) < alpha)


def judge_time(base: Result, new: Result, tolerance: float, alpha: float) -> TimeChange:
    """The verdict on one case's timing from its two runs' rounds, and what decided it."""
    key = (new.case_id, new.scope)
    b, n = base.round_times, new.round_times
    moved = f"median {(new.median - base.median) / base.median:+.1%}" if base.median > 0 else "base median 0"
    if not b or not n:
        which = "base and new runs'" if not b and not n else ("base run's" if not b else "new run's")
        return TimeChange(key, base, new, NOT_ENOUGH_DATA,
                          f"no raw rounds in the {which} JSON (pytest-benchmark's stats.data: written by "
                          f"--benchmark-json, by autosave only with --benchmark-save-data); {moved}")
    floor = smallest_p(len(b), len(n))
    if floor >= alpha:
        return TimeChange(key, base, new, NOT_ENOUGH_DATA,
                          f"{len(b)} and {len(n)} rounds: the smallest two-sided Mann-Whitney p is {floor:.2g}, not "
                          f"below alpha {alpha:g} (needs {rounds_needed(alpha)} rounds each); {moved}")
    base_median, new_median = statistics.median(b), statistics.median(n)
    if base_median <= 0:
        return TimeChange(key, base, new, NOT_ENOUGH_DATA, f"the base rounds' median is {base_median:g} s: no ratio")
    test = mann_whitney(n, b)
    ratio = new_median / base_median
    interval = ratio_ci95(n, b)
    shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "[no interval]"
    stat = f"Mann-Whitney p={test.p_value:.2g} ({test.method}), new/base {ratio:.3f} {shown}"
    relative = ratio - 1
    if test.p_value >= alpha:
        return TimeChange(key, base, new, NO_CHANGE, f"{stat}: p >= alpha {alpha:g}, the runs cannot be told apart",
                          test, ratio, interval)
    if abs(relative) <= tolerance:
        return TimeChange(key, base, new, NO_CHANGE, f"{stat}: p < alpha {alpha:g} but the median moved "
                          f"{relative:+.1%}, within the {_percent(tolerance)} tolerance", test, ratio, interval)
    if interval is not None and (interval[0] <= 1 + tolerance if relative > 0 else interval[1] >= 1 - tolerance):
        return TimeChange(key, base, new, NO_CHANGE, f"{stat}: p < alpha {alpha:g} and the median moved "
                          f"{relative:+.1%}, but its 95% interval reaches within the {_percent(tolerance)} tolerance",
                          test, ratio, interval)
    verdict, how = (REGRESSION, "slower") if relative > 0 else (IMPROVEMENT, "faster")
    return TimeChange(key, base, new, verdict, f"{stat}: p < alpha {alpha:g} and {abs(relative):.1%} {how}, beyond "
                      f"the {_percent(tolerance)} tolerance", test, ratio, interval)


def host_bound(change: TimeChange, tolerance: float, judge: bool = False) -> TimeChange:
    """``change`` re-judged where its path is launch bound: a wall-time move whose GPU work stayed
    within ``tolerance`` is "host-bound" (the host's launching moved), unless ``judge``."""
    if change.verdict not in (REGRESSION, IMPROVEMENT):
        return change
    b, n = change.base.extra, change.new.extra
    busy = b.get("gpu_busy_seconds"), n.get("gpu_busy_seconds")
    if not (b.get("launch_bound") or n.get("launch_bound")) or not all(
            isinstance(x, (int, float)) and x > 0 for x in busy):
        return change
    moved = busy[1] / busy[0] - 1
    shares = "/".join(f"{x:.0%}" if isinstance(x, (int, float)) else "?" for x in
                      (b.get("gpu_busy_fraction"), n.get("gpu_busy_fraction")))
    note = (f"; launch bound (the GPU busy {shares} of a call): its kernels took {busy[0] * 1e3:.1f} -> "
            f"{busy[1] * 1e3:.1f} ms ({moved:+.1%})")
    if abs(moved) > tolerance:
        return replace(change, decided_by=f"{change.decided_by}{note}, beyond the tolerance: the GPU's work moved too")
    if judge:
        return replace(change, decided_by=f"{change.decided_by}{note}, within the tolerance; judged on the wall time "
                       "(--judge-host-bound)")
    return replace(change, verdict=HOST_BOUND, decided_by=f"{change.decided_by}{note}, within the "
                   f"{_percent(tolerance)} tolerance: the host launching the kernels moved, not the GPU's work "
                   "(not a regression; --judge-host-bound counts it, for a quiet dedicated runner)")


def _judge_figure(label: str, direction: int, base: float, new: float, tolerance: float) -> tuple[str, str]:
    if base == new:
        return NO_CHANGE, "unchanged"
    if base == 0 or not math.isfinite(base):
        worse = (new > base) == (direction < 0)
        return (REGRESSION if worse else IMPROVEMENT), f"{label} from {base:.4g} to {new:.4g}"
    relative = (new - base) / abs(base)
    if abs(relative) <= tolerance:
        return NO_CHANGE, f"{label} {relative:+.2%}, within the {_percent(tolerance)} tolerance"
    worse = relative * direction < 0
    return (REGRESSION if worse else IMPROVEMENT), f"{label} {relative:+.2%} beyond the {_percent(tolerance)} tolerance"


def _machine_facts(machine: dict[str, Any]) -> dict[str, Any]:
    facts = {key: machine.get(key) for key in MACHINE_KEYS}
    cpu = machine.get("cpu")
    facts["cpu"] = cpu.get("brand_raw") if isinstance(cpu, dict) else cpu
    return facts


def machine_differences(base: RunSet, new: RunSet) -> list[str]:
    """What differs between the machines and library versions of two runs."""
    facts_b, facts_n = _machine_facts(base.machine), _machine_facts(new.machine)
    out = [f"{key}: {facts_b[key]} -> {facts_n[key]}" for key in MACHINE_KEYS if facts_b[key] != facts_n[key]]
    libs_b, libs_n = base.machine.get("libraries") or {}, new.machine.get("libraries") or {}
    for lib in sorted(set(libs_b) | set(libs_n)):
        if libs_b.get(lib) != libs_n.get(lib):
            out.append(f"{lib}: {libs_b.get(lib)} -> {libs_n.get(lib)}")
    return out


def compare_runs(base: RunSet, new: RunSet, *, tolerance: float | None = None, figure_tolerance: float | None = None,
                 alpha: float | None = None, thresholds: Thresholds | None = None, allow_cross_hardware: bool = False,
                 base_label: str = "base", new_label: str = "new", judge_host_bound: bool = False) -> Comparison:
    """Compare every case the two runs share. ``thresholds`` default to the shipped compare.toml;
    ``tolerance``, ``figure_tolerance`` (fractions) and ``alpha``, when given, replace its values.
    ``judge_host_bound`` judges launch-bound paths on their wall time alone (see :func:`host_bound`)."""
    limits = (thresholds or load_thresholds()).but(alpha=alpha, tolerance=tolerance, memory_tolerance=figure_tolerance)
    hardware = (base.machine.get("hardware_class"), new.machine.get("hardware_class"))
    if hardware[0] != hardware[1] and not allow_cross_hardware:
        raise ConfigFileError(new_label, f"the runs are on different GPU classes ({hardware[0]} vs {hardware[1]}): "
                              "timings are not comparable; pass --allow-cross-hardware to compare anyway")
    result = Comparison(base_label, new_label, machine_differences=machine_differences(base, new), thresholds=limits)
    old, now = _index(base), _index(new)
    result.only_in_base = sorted(f"{k[0]} ({k[1]})" for k in old.keys() - now.keys())
    result.only_in_new = sorted(f"{k[0]} ({k[1]})" for k in now.keys() - old.keys())
    for key in sorted(old.keys() & now.keys()):
        b, n = old[key], now[key]
        result.times.append(host_bound(judge_time(b, n, limits.tolerance, limits.alpha), limits.tolerance,
                                       judge_host_bound))
        for name in FIGURES:
            vb, vn = b.extra.get(name), n.extra.get(name)
            if isinstance(vb, (int, float)) and isinstance(vn, (int, float)):
                label, direction = FIGURES[name]
                verdict, why = _judge_figure(label, direction, float(vb), float(vn), limits.memory_tolerance)
                result.figures.append(FigureChange(key, label, float(vb), float(vn), verdict, why))
    old_v, new_v = _measured(base), _measured(new)
    for (case, metric) in sorted(old_v.keys() & new_v.keys()):
        direction = 1 if METRICS[metric].better == "higher" else -1
        verdict, why = _judge_figure(metric, direction, old_v[(case, metric)], new_v[(case, metric)],
                                     limits.memory_tolerance)
        result.figures.append(FigureChange((case, "gate"), metric, old_v[(case, metric)], new_v[(case, metric)],
                                           verdict, why))
    return result


def _measured(runs: RunSet) -> dict[tuple[str, str], float]:
    """Gate-metric values per (case, metric), those not derived from timings (first wins)."""
    values: dict[tuple[str, str], float] = {}
    for v in runs.verdicts:
        if v["metric"] in METRICS and not any(word in v["metric"] for word in _TIME_DERIVED):
            values.setdefault((v["case"], v["metric"]), float(v["value"]))
    return values


def history_files(storage: str | Path) -> list[Path]:
    """Benchmark JSON files under a pytest-benchmark storage directory, oldest first."""
    storage = Path(storage)
    if not storage.is_dir():
        raise ConfigFileError(storage, "not a directory (give pytest-benchmark's --benchmark-storage path)")
    files = sorted(storage.rglob("*.json"))
    if len(files) < 2:
        raise ConfigFileError(storage, f"holds {len(files)} benchmark file(s); a comparison needs two")

    def when(path: Path) -> str:
        import json

        try:
            return json.loads(path.read_text()).get("datetime") or ""
        except (OSError, ValueError):
            return ""

    return sorted(files, key=lambda p: (when(p), p.name))


def load_history(paths: list[Path]) -> list[tuple[str, RunSet]]:
    """Each run of a history with a short label (its commit, else its file name)."""
    history = []
    for path in paths:
        runs = load_runs([path])
        commit = (runs.data.get("commit_info") or {}).get("id") or ""
        label = (commit[:8] if commit and commit != "unknown" else path.stem)
        history.append((label, runs))
    return history


def trends(history: list[tuple[str, RunSet]]) -> dict[tuple[str, str], list[tuple[str, float, float, float]]]:
    """Per case: (run label, median, q1, q3) over the history, oldest first."""
    series: dict[tuple[str, str], list[tuple[str, float, float, float]]] = {}
    for label, runs in history:
        for key, r in _index(runs).items():
            series.setdefault(key, []).append((label, r.median, r.q1, r.q3))
    return series


def nothing_to_compare(base: RunSet, new: RunSet, comparison: Comparison) -> str | None:
    """Why the comparison says nothing (the same run twice, no case in common), or None."""
    def identity(runs: RunSet) -> tuple[Any, ...]:
        return (runs.data.get("datetime"), (runs.data.get("commit_info") or {}).get("id"),
                len(runs.data.get("benchmarks", [])))
    if identity(base) == identity(new) and base.data.get("benchmarks") == new.data.get("benchmarks"):
        return (f"{comparison.base_label} and {comparison.new_label} are the same run (same time, commit and "
                "benchmarks): compare two runs")
    if not comparison.times and not comparison.figures:
        return f"{comparison.base_label} and {comparison.new_label} have no case in common: nothing was compared"
    return None


def exit_code(comparison: Comparison) -> int:
    """1 when anything regressed, else 0 (cases with too few rounds decide nothing either way)."""
    return 1 if comparison.regressions else 0


def rule(comparison: Comparison) -> str:
    """The decision rule with the thresholds it ran with, in one sentence."""
    t = comparison.thresholds or load_thresholds()
    return (f"Timings: two-sided Mann-Whitney U test of the two runs' rounds and the bootstrap 95% interval of the "
            f"ratio of medians new/base; a regression (improvement) needs p < {t.alpha:g} and a median more than "
            f"{_percent(t.tolerance)} slower (faster), with the interval wholly beyond that; a launch-bound path whose "
            f"GPU work moved within the tolerance is \"host-bound\", not a regression; with fewer rounds than the "
            f"test needs to reach p < {t.alpha:g} "
            f"(3 and 3 rounds: p >= 0.1) the verdict is \"not enough data\". Memory and quality figures: "
            f"{_percent(t.memory_tolerance)} tolerance. Thresholds from {t.path or 'the caller'}.")


def summary(comparison: Comparison) -> str:
    counts = {v: sum(c.verdict == v for c in comparison.times) for v in VERDICTS}
    figures = sum(c.verdict == REGRESSION for c in comparison.figures)
    return (f"{len(comparison.regressions)} regression(s) ({counts[REGRESSION]} timing, {figures} memory or quality); "
            f"timings: {counts[IMPROVEMENT]} improvement(s), "
            + (f"{counts[HOST_BOUND]} host-bound, " if counts[HOST_BOUND] else "")
            + f"{counts[NO_CHANGE]} no change, "
            f"{counts[NOT_ENOUGH_DATA]} not enough data")


def as_text(comparison: Comparison) -> str:
    """A terminal-friendly table of the time verdicts, regressions first."""
    order = {v: i for i, v in enumerate(VERDICTS)}
    lines = [f"{comparison.base_label} -> {comparison.new_label}"]
    lines += [f"  machine: {d}" for d in comparison.machine_differences]
    for c in sorted([*comparison.times], key=lambda c: order[c.verdict]):
        lines.append(f"  {c.verdict.upper():16s} {c.key[0]} ({c.key[1]}): {c.base.median:.4g} -> {c.new.median:.4g} s; "
                     f"{c.decided_by}")
    for c in comparison.figures:
        if c.verdict in (REGRESSION, IMPROVEMENT):
            lines.append(f"  {c.verdict.upper():16s} {c.key[0]} ({c.key[1]}) {c.figure}: {c.base:.4g} -> {c.new:.4g}; "
                         f"{c.decided_by}")
    lines.append(summary(comparison))
    return "\n".join(lines) + "\n"
