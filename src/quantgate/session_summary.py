"""The lines quantgate adds to pytest's terminal summary: what ran, what was left out and why,
the gates, what was measured without a gate, skips by reason, releases and where the time went."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from quantgate.gates import format_value


def _grouped_reason(record: Mapping[str, Any]) -> str:
    reason = record.get("reason") or "(no reason given)"
    case = record.get("case")
    return reason.replace(case, "<case>") if case else reason


def skipped_by_reason(outcomes: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, int]]:
    """Skip reasons, the case id replaced by ``<case>`` so that one reason is one line, most frequent first."""
    counts = Counter(_grouped_reason(o) for o in outcomes.values() if o.get("outcome") == "skipped")
    return counts.most_common()


def ungated_by_metric(verdicts: Iterable[Mapping[str, Any]]) -> list[str]:
    """One line per metric measured without a gate: how many cases and the range of values."""
    values: dict[str, list[float]] = {}
    for v in verdicts:
        if v.get("passed") is None:
            values.setdefault(v["metric"], []).append(float(v["value"]))
    return [f"{metric}: {len(vals)} case{'s' if len(vals) > 1 else ''}, "
            + (f"{min(vals):.4g}" if min(vals) == max(vals) else f"{min(vals):.4g} to {max(vals):.4g}")
            for metric, vals in sorted(values.items())]


def lines(run: Any, phases: Mapping[str, float] | None = None, wall_seconds: float | None = None) -> list[str]:
    """The quantgate section of the terminal summary."""
    out = []
    if run.plan is not None:
        out.append(f"plan: {run.plan.name}" + (f" ({run.plan.path})" if run.plan.path else "")
                   + (f": {run.plan.description}" if run.plan.description else ""))
    if getattr(run, "interrupted", None):
        stop = run.interrupted
        out.append(f"INTERRUPTED in {stop['in_test']} after {stop['finished_tests']} tests: the results are partial "
                   "(the JSON's quantgate.interrupted says so)")
    left = sum(run.left_out.values())
    if left:
        out.append(f"not generated: {left} (test, case) pairs that cannot run here or cannot apply")
        out += [f"  {count:5d}  {reason}" for reason, count in run.left_out.most_common()]
    passed = sum(v["passed"] is True for v in run.verdicts)
    failed = sum(v["passed"] is False for v in run.verdicts)
    ungated = sum(v["passed"] is None for v in run.verdicts)
    if run.verdicts:
        out.append(f"gates: {passed} passed, {failed} failed, {ungated} measured without a gate ({run.gates.path})")
        out += [f"  FAILED {v['case']}: {v['message']}" for v in run.verdicts if v["passed"] is False]
    if ungated:
        out.append("measured without a gate (recorded in the JSON; add a [[gate]] to enforce one):")
        out += [f"  {line}" for line in ungated_by_metric(run.verdicts)]
    skips = skipped_by_reason(run.outcomes)
    if skips:
        out.append(f"skipped: {sum(n for _, n in skips)}, by reason")
        out += [f"  {count:5d}  {reason}" for reason, count in skips]
    if run.releases:
        worst = max(run.releases, key=lambda r: r["leaked_bytes"])
        after = f" (released after {worst['last_test']})" if worst.get("last_test") else ""
        out.append(f"releases: {len(run.releases)}, largest leak {format_value(worst['leaked_bytes'], 'bytes')} "
                   f"in {worst['pipeline']}{after}")
        for r in run.releases:
            if r.get("passed") is False:
                after = f" after {r['last_test']}" if r.get("last_test") else ""
                load = " (its load failed)" if r.get("failed_load") else ""
                out.append(f"  LEAK {r['pipeline']}{load}: {format_value(r['leaked_bytes'], 'bytes')} "
                           f"still allocated above the baseline{after}")
    if wall_seconds is not None:
        spent = [f"{name} {seconds:.1f} s" for name, seconds in (phases or {}).items() if seconds >= 0.05]
        out.append(f"wall: {wall_seconds:.1f} s" + (f" ({', '.join(spent)})" if spent else ""))
    return out
