"""``quantgate report``, ``summary``, ``compare``, ``merge`` and ``regate``: reading benchmark JSON.

    quantgate report BENCH.json -o DIR    HTML report + Markdown twin (checklist, plots, recommendations)
    quantgate summary BENCH.json          the report's Markdown twin on standard output
    quantgate compare OLD.json NEW.json   rank test of each case's rounds across commits; exit 1 on a regression
    quantgate merge A.json B.json -o M    join runs split over several commands into one JSON
    quantgate regate RUN.json [--changed] a run's measured values against the current gates

The claims, gates and compare thresholds default to the repository's ``fixtures/`` files where
the command runs, else to the copies shipped in the package (``quantgate/data``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import QuantgateError

if TYPE_CHECKING:
    from quantgate.report.claims import Claims


def shipped(name: str, relative: str) -> Path:
    """``relative`` (a repository data file) where the command runs, else the copy shipped in the
    package (``quantgate/data/NAME``), so that the commands work outside the repository."""
    here = Path(relative)
    if here.exists():  # a file, or a directory of them (fixtures/gates/)
        return here
    from importlib.resources import files

    return Path(str(files("quantgate") / "data" / name))


def _claims(path: str | None) -> Claims:
    from quantgate.report.claims import load_claims

    claims = Path(path) if path else shipped("claims.toml", "fixtures/claims.toml")
    if not claims.is_file():
        raise QuantgateError(f"{claims} not found: pass --claims FILE (the repository's fixtures/claims.toml)")
    return load_claims(claims)


def _summary(args: argparse.Namespace) -> int:
    from quantgate.atomic import atomic_write_text
    from quantgate.report.build import build_report
    from quantgate.report.document import to_markdown
    from quantgate.results import load_runs

    text = to_markdown(build_report(load_runs(args.benchmark_json, args.allow_mixed_machines), _claims(args.claims),
                                    args.title))
    if args.output:
        atomic_write_text(args.output, text)
    else:
        print(text, end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from quantgate.report.build import write_report
    from quantgate.results import load_runs

    html_file, md_file = write_report(load_runs(args.benchmark_json, args.allow_mixed_machines), _claims(args.claims),
                                      args.title, args.output)
    print(f"{html_file}\n{md_file}")
    if args.screenshot:
        from quantgate.report.browser import screenshot

        print(screenshot(html_file, Path(args.output) / "report.png", height=args.screenshot_height))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from quantgate.atomic import atomic_write_text
    from quantgate.history.compare import (
        as_text,
        compare_runs,
        exit_code,
        history_files,
        load_history,
        load_thresholds,
        nothing_to_compare,
    )
    from quantgate.report.comparison import render
    from quantgate.report.document import to_html, to_markdown

    if args.storage:
        files = history_files(args.storage)
        if args.runs:
            raise QuantgateError("give either --storage or benchmark files, not both")
    else:
        files = [Path(p) for p in args.runs]
        if len(files) < 2:
            raise QuantgateError("compare needs two benchmark files (BASE NEW ...) or --storage DIR")
    history = load_history(files)
    (base_label, base), (new_label, new) = history[-2], history[-1]
    thresholds = load_thresholds(args.thresholds or shipped("compare.toml", "fixtures/compare.toml"))

    def fraction(percent: float | None) -> float | None:
        return None if percent is None else percent / 100

    comparison = compare_runs(base, new, tolerance=fraction(args.tolerance),
                              figure_tolerance=fraction(args.memory_tolerance), alpha=args.alpha, thresholds=thresholds,
                              allow_cross_hardware=args.allow_cross_hardware, base_label=base_label,
                              new_label=new_label, judge_host_bound=args.judge_host_bound)
    for label, runs in ((base_label, base), (new_label, new)):
        for stop in runs.interrupted:  # a partial run compares fewer cases; say so before the verdict
            print(f"note: {label} is partial: interrupted (Ctrl-C) in {stop.get('in_test')} after "
                  f"{stop.get('finished_tests')} tests")
    print(as_text(comparison), end="")
    if (empty := nothing_to_compare(base, new, comparison)) is not None:
        print(f"quantgate compare: {empty}", file=sys.stderr)
        return 2  # neither a pass nor a regression
    if args.output:
        doc = render(comparison, history, title=f"quantgate compare: {base_label} -> {new_label}")
        out = Path(args.output)
        atomic_write_text(out / "compare.html", to_html(doc))
        atomic_write_text(out / "compare.md", to_markdown(doc))
    return exit_code(comparison)


def _merge(args: argparse.Namespace) -> int:
    from quantgate.atomic import atomic_write_json
    from quantgate.results import merge_benchmark_json

    merged = merge_benchmark_json(args.inputs, allow_mixed_machines=args.allow_mixed_machines,
                                  allow_missing_shards=args.allow_missing_shards)
    atomic_write_json(args.output, merged)
    print(f"{args.output}: {len(merged['benchmarks'])} benchmarks from {len(args.inputs)} files")
    shards = merged["quantgate"].get("shards")
    if shards is not None:
        missing = ", ".join(f"{i}/{shards['count']}" for i in shards["missing"])
        print(f"shards of one selection: {len(shards['present'])} of {shards['count']}"
              + (f"; MISSING {missing}" if missing else ""))
    return 0


def _regate(args: argparse.Namespace) -> int:
    from quantgate.history.regate import as_text, exit_code, load_gates, recheck_run
    from quantgate.results import load_benchmark_json

    book = load_gates(args.gates or shipped("gates", "fixtures/gates"))
    rows = [row for path in args.runs for row in recheck_run(str(path), load_benchmark_json(path), book)]
    print(as_text(rows, changed_only=args.changed), end="")
    return exit_code(rows)


def register(sub: Any) -> None:
    """Register ``report``, ``summary``, ``compare``, ``merge`` and ``regate`` on the main parser's subcommands."""
    p = sub.add_parser("report", help="an HTML report and its Markdown twin from benchmark JSON files")
    p.add_argument("benchmark_json", nargs="+", help="files written by pytest --benchmark-json (merged if several)")
    p.add_argument("-o", "--output", required=True, help="directory for report.html and report.md")
    p.add_argument("--title", default="quantgate report", help="the report's heading")
    p.add_argument("--claims", help="the claims' success criteria and memory budgets (default: fixtures/claims.toml)")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="merge files from different GPUs, drivers or library versions (as quantgate merge)")
    p.add_argument("--screenshot", action="store_true", help="also render report.png in headless Chromium")
    p.add_argument("--screenshot-height", type=int, default=2400, help="pixels (default: 2400)")
    p.set_defaults(func=_report)

    p = sub.add_parser("summary", help="the report's Markdown twin on standard output")
    p.add_argument("benchmark_json", nargs="+", help="files written by pytest --benchmark-json")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.add_argument("--title", default="quantgate run", help="the summary's heading")
    p.add_argument("--claims", help="the claims' success criteria and memory budgets (default: fixtures/claims.toml)")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="merge files from different GPUs, drivers or library versions (as quantgate merge)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("compare", help="compare benchmark runs across commits (Mann-Whitney U test of each case's "
                       "rounds); exit 1 on regression")
    p.add_argument("runs", nargs="*", help="benchmark JSON files, oldest first; the last two are compared")
    p.add_argument("--storage", help="a pytest-benchmark storage directory (--benchmark-storage) to read instead")
    p.add_argument("--thresholds", default=None, help="alpha and the tolerances (default: fixtures/compare.toml here, "
                   "else the one shipped with quantgate)")
    p.add_argument("--alpha", type=float, default=None,
                   help="significance level of the rank test, e.g. 0.01 (default: the thresholds file's)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="percent a median must move, significantly, to count (default: the thresholds file's)")
    p.add_argument("--memory-tolerance", type=float, default=None,
                   help="percent memory and quality figures may move (default: the thresholds file's)")
    p.add_argument("--judge-host-bound", action="store_true",
                   help="judge launch-bound paths on their wall time even where their GPU work did not move (by "
                        "default such a move is 'host-bound': the host CPU's launching, not a regression)")
    p.add_argument("--allow-cross-hardware", action="store_true", help="compare runs from different GPU classes")
    p.add_argument("-o", "--output", help="directory for compare.html (with trend plots) and compare.md")
    p.set_defaults(func=_compare)

    p = sub.add_parser("merge", help="join benchmark JSON files of runs split over several commands")
    p.add_argument("inputs", nargs="+", help="benchmark JSON files written by quantgate runs")
    p.add_argument("-o", "--output", required=True, help="the merged file")
    p.add_argument("--allow-mixed-machines", action="store_true",
                   help="merge files from different GPUs, drivers or library versions")
    p.add_argument("--allow-missing-shards", action="store_true",
                   help="merge the shards of a --quantgate-shard run even where some are missing (listed)")
    p.set_defaults(func=_merge)

    p = sub.add_parser("regate", help="re-check a run's measured values against the current gates; exit 1 on a failure")
    p.add_argument("runs", nargs="+", help="benchmark JSON files written by quantgate runs")
    p.add_argument("--gates", default=None,
                   help="a gates file or directory (default: fixtures/gates here, else the one shipped with quantgate)")
    p.add_argument("--changed", action="store_true", help="list only values whose verdict differs from the run's own")
    p.set_defaults(func=_regate)
