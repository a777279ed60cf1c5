"""``quantgate plan [NAME]``: what a plan selects, and how long it should take.

The selection is pytest's own collection of the suite with ``--quantgate-plan NAME`` (run in
the repository, where the tests are), so it is exactly what ``pytest -m gpu`` would run; on a
machine without a GPU the GPU tier is collected as if one were there. The expected time
comes from recorded runs: the outcomes of benchmark JSON files (``--durations``, default every
JSON under ``reports/``) give each test's seconds, its pipeline load included where it was
the first of its group; tests no run recorded are counted apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from quantgate.options import PLAN_PREVIEW_ENV as PREVIEW_ENV  # collect the GPU tier without a GPU


class _Collector:
    def __init__(self) -> None:
        self.items: list[tuple[str, str | None, str]] = []
        self.summary: dict[str, Any] = {}

    def pytest_collection_finish(self, session: Any) -> None:
        from quantgate.plugin.session import case_of, run_of

        for item in session.items:
            case = case_of(item)
            self.items.append((item.nodeid, case.id if case is not None else None, item.originalname))
        run = run_of(session.config)
        self.summary = {"plan": run.plan.as_dict() if run.plan else None, "not_generated": dict(run.left_out)}


def collect(plan: str, tier: str, extra: list[str]) -> _Collector:
    """The (nodeid, case id, test name) pairs ``pytest -m TIER --quantgate-plan PLAN`` selects."""
    import pytest

    collector = _Collector()
    os.environ[PREVIEW_ENV] = "1"
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
            code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", f"--quantgate-plan={plan}",
                                "-m", tier, *extra], plugins=[collector])
    finally:
        os.environ.pop(PREVIEW_ENV, None)
    if code not in (0, 5):
        from quantgate.errors import QuantgateError

        raise QuantgateError(f"collecting plan {plan!r} failed (pytest exit {code}):\n{out.getvalue()[-2000:]}")
    return collector


def recorded_durations(paths: list[Path]) -> dict[str, float]:
    """Seconds per test nodeid from the outcomes of benchmark JSON files (the latest run wins)."""
    found: list[tuple[str, dict[str, float]]] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        outcomes = (data.get("quantgate") or {}).get("outcomes") if isinstance(data, dict) else None
        if not outcomes:
            continue
        found.append((str(data.get("datetime", "")), {re.sub(r" \(part \d+\)$", "", node): float(o.get("duration_s") or 0)
                                                     for node, o in outcomes.items() if o.get("outcome")}))
    durations: dict[str, float] = {}
    for _, run in sorted(found, key=lambda pair: pair[0]):
        durations.update(run)
    return durations


def _plan(args: argparse.Namespace) -> int:
    files = [Path(p) for p in args.durations] if args.durations is not None else sorted(Path("reports").rglob("*.json"))
    collector = collect(args.name, args.tier, args.pytest_args or [])
    durations = recorded_durations(files)
    groups: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
    for nodeid, case, _test in collector.items:
        groups[case or "(harness tests)"].append((nodeid, durations.get(nodeid)))
    plan = collector.summary.get("plan") or {}
    print(f"plan {plan.get('name', args.name)}: {plan.get('description', '')}".rstrip(": "))
    known_total, unknown = 0.0, 0
    for case, tests in groups.items():
        known = [d for _, d in tests if d is not None]
        known_total += sum(known)
        unknown += len(tests) - len(known)
        print(f"  {case:58s} {len(tests):3d} tests  {sum(known):7.1f} s"
              + (f"  ({len(tests) - len(known)} without a recorded duration)" if len(known) < len(tests) else ""))
        if args.verbose:
            for nodeid, seconds in tests:
                print(f"      {f'{seconds:7.1f} s' if seconds is not None else '      ?  '}  {nodeid}")
    total = sum(len(t) for t in groups.values())
    print(f"{total} tests in {len(groups)} groups; expected {known_total / 60:.1f} min from "
          f"{len(files)} recorded runs" + (f", and {unknown} tests no run recorded" if unknown else ""))
    left = collector.summary.get("not_generated") or {}
    if left:
        print(f"not generated: {sum(left.values())} (test, case) pairs")
        for reason, count in sorted(left.items(), key=lambda kv: -kv[1]):
            print(f"  {count:5d}  {reason}")
    for line in plan.get("leaves", []):
        print(f"leaves: {line}")
    return 0


def register(sub: Any) -> None:
    """Register ``quantgate plan`` on the main parser's subcommands."""
    p = sub.add_parser("plan", help="what a plan (fixtures/plans/NAME.toml) selects and its expected time")
    p.add_argument("name", nargs="?", default="merge", help="a plan name or a .toml path (default: merge)")
    p.add_argument("--tier", choices=("gpu", "cpu"), default="gpu", help="which tier's cases (default: gpu)")
    p.add_argument("--durations", nargs="*", help="benchmark JSON files whose outcomes give each test's seconds "
                                                 "(default: every JSON under reports/)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every test with its recorded duration")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -- -k lora")
    p.set_defaults(func=_plan)
