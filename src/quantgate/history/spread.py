"""Does spreading a run change its results? One selection run in one process and spread over
xdist workers (or shards), compared: the same tests with the same outcomes, each timed scope's
rounds indistinguishable by ``quantgate compare``'s rank test, and the wall-time ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantgate.history.compare import NO_CHANGE, NOT_ENOUGH_DATA, judge_time, load_thresholds
from quantgate.results import load_benchmark_json, load_runs


def compare_spread(single: str | Path, spread: str | Path, single_wall_s: float | None = None,
                   spread_wall_s: float | None = None, alpha: float | None = None) -> dict[str, Any]:
    """The comparison of a one-process run (``single``) with the same selection spread out.

    A median is within the measured spread when ``quantgate compare``'s Mann-Whitney test of the
    two runs' rounds cannot tell them apart (p >= alpha, from compare.toml unless given; no
    tolerance): ``within_spread`` True, False when it can, None when the rounds are too few for
    the test to decide (3 and 3 rounds never reach p < 0.05).
    """
    alpha = load_thresholds().alpha if alpha is None else alpha
    outcomes = [{node: o["outcome"] for node, o in load_benchmark_json(p)["quantgate"]["outcomes"].items()}
                for p in (single, spread)]
    indexed = []
    for path in (single, spread):
        results = {}
        for r in load_runs([path]).results:
            results[(r.name, r.scope)] = r
        indexed.append(results)
    medians = []
    for key in sorted(set(indexed[0]) & set(indexed[1])):
        base, new = indexed[0][key], indexed[1][key]
        change = judge_time(base, new, tolerance=0.0, alpha=alpha)
        within = None if change.verdict == NOT_ENOUGH_DATA else change.verdict == NO_CHANGE
        medians.append({"benchmark": key[0], "scope": key[1], "single_median_s": base.median,
                        "spread_median_s": new.median, "within_spread": within, "why": change.decided_by})
    report: dict[str, Any] = {
        "same_results": outcomes[0] == outcomes[1],
        "tests": len(outcomes[0]),
        "only_single": sorted(set(outcomes[0]) - set(outcomes[1])),
        "only_spread": sorted(set(outcomes[1]) - set(outcomes[0])),
        "different_outcome": sorted(n for n in set(outcomes[0]) & set(outcomes[1]) if outcomes[0][n] != outcomes[1][n]),
        "benchmarks_only_single": sorted(f"{n} {s}" for n, s in set(indexed[0]) - set(indexed[1])),
        "benchmarks_only_spread": sorted(f"{n} {s}" for n, s in set(indexed[1]) - set(indexed[0])),
        "medians": medians,
        "medians_within_spread": sum(m["within_spread"] is True for m in medians),
        "medians_undecided": sum(m["within_spread"] is None for m in medians),
    }
    if single_wall_s and spread_wall_s:
        report.update(single_wall_s=single_wall_s, spread_wall_s=spread_wall_s,
                      scaling=round(single_wall_s / spread_wall_s, 3))
    return report


def as_text(report: dict[str, Any]) -> str:
    """A few lines a person reads: the verdicts first, then each median that moved."""
    lines = [f"same results: {report['same_results']} ({report['tests']} tests)",
             f"medians within the measured spread: {report['medians_within_spread']} of {len(report['medians'])}"
             + (f" ({report['medians_undecided']} with too few rounds to tell)" if report.get("medians_undecided") else "")]
    if "scaling" in report:
        lines.append(f"wall time: one process {report['single_wall_s']:.1f} s, spread {report['spread_wall_s']:.1f} s, "
                     f"ratio {report['scaling']:.2f}x")
    for key in ("only_single", "only_spread", "different_outcome", "benchmarks_only_single", "benchmarks_only_spread"):
        lines += [f"  {key}: {item}" for item in report[key]]
    lines += [f"  outside the spread: {m['benchmark']} {m['scope']}: {m['why']}" for m in report["medians"]
              if m["within_spread"] is False]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m quantgate.history.spread SINGLE.json SPREAD.json [--walls S1 S2] [-o OUT.json]``;
    exit 1 when the results differ."""
    import argparse

    from quantgate.atomic import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m quantgate.history.spread", description=__doc__)
    parser.add_argument("single", help="benchmark JSON of the one-process run")
    parser.add_argument("spread", help="benchmark JSON of the same selection with -n N (or merged shards)")
    parser.add_argument("--walls", nargs=2, type=float, metavar=("SINGLE_S", "SPREAD_S"), help="the two wall times")
    parser.add_argument("-o", "--output", help="write the comparison as JSON")
    args = parser.parse_args(argv)
    walls = args.walls or (None, None)
    report = compare_spread(args.single, args.spread, *walls)
    print(as_text(report), end="")
    if args.output:
        atomic_write_json(args.output, report)
    return 0 if report["same_results"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
