"""Benchmark history across commits: per case, did the median move beyond the noise?

Inputs are pytest-benchmark JSON files written with the quantgate plugin: files given one by
one, or a pytest-benchmark storage directory (``--benchmark-autosave`` /
``--benchmark-storage``), read oldest to newest. The last run is compared with the one before
it (or with an explicit base), and each case's history feeds a trend plot.

A timing change is noise when the two runs cannot be told apart: their min-max ranges overlap,
or the medians differ by no more than the larger interquartile range. Only a change outside the
noise and larger than the tolerance is a regression (or an improvement). The verdict names
the statistic that decided it. Memory (footprint, peak) and quality figures are compared too:
they are not noisy, so only the tolerance applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError
from quantgate.gates import METRICS
from quantgate.report.runs import Result, RunSet, load_runs

# extra_info fields compared besides time: name -> (label, +1 if higher is better else -1)
FIGURES: dict[str, tuple[str, int]] = {
    "denoiser_footprint_bytes": ("transformer footprint", -1),
    "peak_allocated_bytes": ("peak allocated", -1),
}
# Gate metrics derived from timings are noisy; their inputs are compared as times instead.
_TIME_DERIVED = ("speedup", "timing")
MACHINE_KEYS = ("gpu", "hardware_class", "nvidia_driver", "cuda_runtime")


@dataclass
class TimeChange:
    """How one case's median moved between two runs, and why that is or is not a regression."""

    key: tuple[str, str]
    base: Result
    new: Result
    verdict: str  # "regression", "improvement", "noise", "within tolerance"
    decided_by: str

    @property
    def relative(self) -> float:
        return (self.new.median - self.base.median) / self.base.median


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

    @property
    def regressions(self) -> list[TimeChange | FigureChange]:
        return [c for c in [*self.times, *self.figures] if c.verdict == "regression"]


def _index(runs: RunSet) -> dict[tuple[str, str], Result]:
    indexed: dict[tuple[str, str], Result] = {}
    for r in runs.results:
        indexed.setdefault((r.case_id, r.scope), r)  # merged files: the first part's measurement
    return indexed


def judge_time(base: Result, new: Result, tolerance: float) -> tuple[str, str]:
    """The verdict on a median's move and the statistic that decided it."""
    delta = new.median - base.median
    relative = delta / base.median
    spread = max(base.iqr, new.iqr)
    if new.min <= base.max and base.min <= new.max:
        return "noise", (f"min-max ranges overlap ({base.min:.4g}-{base.max:.4g} s vs {new.min:.4g}-{new.max:.4g} s); "
                         f"median {relative:+.1%}")
    if abs(delta) <= spread:
        return "noise", f"|Δmedian| {abs(delta):.4g} s <= IQR {spread:.4g} s; median {relative:+.1%}"
    if abs(relative) <= tolerance:
        return "within tolerance", (f"median {relative:+.1%} is outside the noise (ranges disjoint, |Δ| > IQR) "
                                    f"but within the {tolerance:.0%} tolerance")
    verdict = "regression" if relative > 0 else "improvement"
    return verdict, (f"median {relative:+.1%} exceeds the {tolerance:.0%} tolerance, ranges disjoint and "
                     f"|Δ| {abs(delta):.4g} s > IQR {spread:.4g} s")


def _judge_figure(label: str, direction: int, base: float, new: float, tolerance: float) -> tuple[str, str]:
    if base == new:
        return "noise", "unchanged"
    if base == 0 or not math.isfinite(base):
        worse = (new > base) == (direction < 0)
        return ("regression" if worse else "improvement"), f"{label} from {base:.4g} to {new:.4g}"
    relative = (new - base) / abs(base)
    if abs(relative) <= tolerance:
        return ("noise" if relative == 0 else "within tolerance"), f"{label} {relative:+.2%} (tolerance {tolerance:.0%})"
    worse = relative * direction < 0
    return ("regression" if worse else "improvement"), f"{label} {relative:+.2%} beyond the {tolerance:.0%} tolerance"


def machine_differences(base: RunSet, new: RunSet) -> list[str]:
    """What differs between the machines and library versions of two runs."""
    out = []
    for key in MACHINE_KEYS:
        if base.machine.get(key) != new.machine.get(key):
            out.append(f"{key}: {base.machine.get(key)} -> {new.machine.get(key)}")
    libs_b, libs_n = base.machine.get("libraries") or {}, new.machine.get("libraries") or {}
    for lib in sorted(set(libs_b) | set(libs_n)):
        if libs_b.get(lib) != libs_n.get(lib):
            out.append(f"{lib}: {libs_b.get(lib)} -> {libs_n.get(lib)}")
    return out


def compare_runs(base: RunSet, new: RunSet, *, tolerance: float = 0.05, figure_tolerance: float = 0.01,
                 allow_cross_hardware: bool = False, base_label: str = "base", new_label: str = "new") -> Comparison:
    """Compare every case the two runs share."""
    hardware = (base.machine.get("hardware_class"), new.machine.get("hardware_class"))
    if hardware[0] != hardware[1] and not allow_cross_hardware:
        raise ConfigFileError(new_label, f"the runs are on different GPU classes ({hardware[0]} vs {hardware[1]}): "
                              "timings are not comparable; pass --allow-cross-hardware to compare anyway")
    result = Comparison(base_label, new_label, machine_differences=machine_differences(base, new))
    old, now = _index(base), _index(new)
    result.only_in_base = sorted(f"{k[0]} ({k[1]})" for k in old.keys() - now.keys())
    result.only_in_new = sorted(f"{k[0]} ({k[1]})" for k in now.keys() - old.keys())
    for key in sorted(old.keys() & now.keys()):
        b, n = old[key], now[key]
        verdict, why = judge_time(b, n, tolerance)
        result.times.append(TimeChange(key, b, n, verdict, why))
        for name in FIGURES:
            vb, vn = b.extra.get(name), n.extra.get(name)
            if isinstance(vb, (int, float)) and isinstance(vn, (int, float)):
                label, direction = FIGURES[name]
                verdict, why = _judge_figure(label, direction, float(vb), float(vn), figure_tolerance)
                result.figures.append(FigureChange(key, label, float(vb), float(vn), verdict, why))
    old_v, new_v = _measured(base), _measured(new)
    for (case, metric) in sorted(old_v.keys() & new_v.keys()):
        direction = 1 if METRICS[metric].better == "higher" else -1
        verdict, why = _judge_figure(metric, direction, old_v[(case, metric)], new_v[(case, metric)], figure_tolerance)
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
    """1 when any regression exceeds its tolerance, else 0."""
    return 1 if comparison.regressions else 0


def render(comparison: Comparison, history: list[tuple[str, RunSet]] | None = None, title: str = "quantgate compare"):
    """The comparison as a report Document (tables; trend plots when a history is given)."""
    from quantgate.report import plots
    from quantgate.report.document import Bullets, Document, Figure, Paragraph, Section, Table

    classes = {"regression": "fail", "improvement": "pass", "noise": "", "within tolerance": "skip"}
    rows = [[f"{c.key[0]} ({c.key[1]})", f"{c.base.median:.4g}", f"{c.new.median:.4g}", f"{c.relative:+.1%}",
             c.verdict, c.decided_by] for c in comparison.times]
    figure_rows = [[f"{c.key[0]} ({c.key[1]})", c.figure, f"{c.base:.4g}", f"{c.new:.4g}", c.verdict, c.decided_by]
                   for c in comparison.figures if c.verdict != "noise"]
    regressions = comparison.regressions
    sections = [
        Section("Verdict", [Paragraph(
            f"{len(regressions)} regression(s) between {comparison.base_label} and {comparison.new_label}"
            + (": " + "; ".join(f"{c.key[0]} ({c.key[1]})" for c in regressions) if regressions else "."))]),
        Section("Machines", [Bullets(comparison.machine_differences or ["same GPU, driver, CUDA and libraries"])]),
        Section("Time", [Table(["case (scope)", f"{comparison.base_label} median s", f"{comparison.new_label} median s",
                                "change", "verdict", "decided by"], rows,
                               [classes[c.verdict] for c in comparison.times])]),
        Section("Memory and quality", [Table(["case (scope)", "figure", comparison.base_label, comparison.new_label,
                                              "verdict", "decided by"], figure_rows,
                                             [classes[c.verdict] for c in comparison.figures if c.verdict != "noise"])
                                       if figure_rows else Paragraph("No memory or quality figure changed.")]),
    ]
    if comparison.only_in_base or comparison.only_in_new:
        only = ([f"only in {comparison.base_label}: {k}" for k in comparison.only_in_base]
                + [f"only in {comparison.new_label}: {k}" for k in comparison.only_in_new])
        sections.append(Section("Not compared", [Bullets(only)]))
    if history and len(history) >= 2:
        figures = [Figure(plots.trend(points, f"{key[0]} ({key[1]})"), f"{key[0]} ({key[1]}): median and IQR per run")
                   for key, points in sorted(trends(history).items()) if len(points) >= 2]
        sections.append(Section("Trends", figures or [Paragraph("No case appears in two runs.")]))
    return Document(title, sections)


def as_text(comparison: Comparison) -> str:
    """A terminal-friendly table of the time verdicts, regressions first."""
    order = {"regression": 0, "improvement": 1, "within tolerance": 2, "noise": 3}
    lines = [f"{comparison.base_label} -> {comparison.new_label}"]
    lines += [f"  machine: {d}" for d in comparison.machine_differences]
    for c in sorted([*comparison.times], key=lambda c: order[c.verdict]):
        lines.append(f"  {c.verdict.upper():16s} {c.key[0]} ({c.key[1]}): {c.base.median:.4g} -> {c.new.median:.4g} s; "
                     f"{c.decided_by}")
    for c in comparison.figures:
        if c.verdict in ("regression", "improvement"):
            lines.append(f"  {c.verdict.upper():16s} {c.key[0]} ({c.key[1]}) {c.figure}: {c.base:.4g} -> {c.new:.4g}; "
                         f"{c.decided_by}")
    lines.append(f"{len(comparison.regressions)} regression(s)")
    return "\n".join(lines) + "\n"


