"""The claims of the plans quantgate started from (fixtures/claims.toml): criteria filled in from a
run's verdicts and outcomes. (The named selections a run makes are ``quantgate.plans``.)"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError
from quantgate.results import RunSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SELECTOR_KEYS = ("model", "source", "scheme", "variant", "batch", "hardware")


@dataclass(frozen=True)
class Criterion:
    claim: str
    metric: str | None
    tests: tuple[str, ...]  # any of these tests' outcomes decides it (with no metric)
    selectors: Mapping[str, tuple[Any, ...]]
    each: str | None = None  # a selector every listed value of which must be covered
    min: float | None = None  # the claim's own number: a gate verdict alone does not meet it
    max: float | None = None

    def meets(self, value: Any) -> bool:
        """Whether a measured value meets the claim's own bounds (none given: the gate decides)."""
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def matches(self, record: Mapping[str, Any]) -> bool:
        return all(record.get(k) in v for k, v in self.selectors.items())


@dataclass(frozen=True)
class ClaimGroup:
    """One source of claims (the SVDQuant paper, TorchAO's FLUX recipe, the SD3.5 GPTQ plan)."""

    name: str
    criteria: tuple[Criterion, ...]


@dataclass(frozen=True)
class Budget:
    name: str
    bytes: int


@dataclass(frozen=True)
class Claims:
    groups: tuple[ClaimGroup, ...]
    budgets: tuple[Budget, ...]
    memory_reduction_line: float = 3.5


def load_claims(path: str | Path) -> Claims:
    """Read and validate fixtures/claims.toml."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(path, f"cannot read claims: {exc}") from None
    unknown_tables = sorted(set(data) - {"claims", "budget", "report"})
    if unknown_tables:
        raise ConfigFileError(path, f"unknown table {unknown_tables[0]!r} (valid: claims, budget, report)")
    groups = []
    for p in data.get("claims", []):
        criteria = []
        for c in p.get("criterion", []):
            unknown = set(c) - {"claim", "metric", "test", "each", "min", "max", *SELECTOR_KEYS}
            if unknown or "claim" not in c or not (c.get("metric") or c.get("test")):
                raise ConfigFileError(path, f"criterion {c.get('claim')!r} needs a claim and a metric or test"
                                      + (f"; unknown keys {sorted(unknown)}" if unknown else ""), key=p.get("name"))
            selectors = {k: tuple(c[k] if isinstance(c[k], list) else [c[k]]) for k in SELECTOR_KEYS if k in c}
            if c.get("each") and c["each"] not in selectors:
                raise ConfigFileError(path, f"criterion {c['claim']!r}: each = {c['each']!r} names no selector",
                                      key=p.get("name"))
            tests = c.get("test") or ()
            bounds = {k: float(c[k]) for k in ("min", "max") if k in c}
            if bounds and not c.get("metric"):
                raise ConfigFileError(path, f"criterion {c['claim']!r}: min/max bound a metric; it names none",
                                      key=p.get("name"))
            criteria.append(Criterion(c["claim"], c.get("metric"), tuple([tests] if isinstance(tests, str) else tests),
                                      selectors, c.get("each"), bounds.get("min"), bounds.get("max")))
        groups.append(ClaimGroup(p["name"], tuple(criteria)))
    budgets = tuple(Budget(b["name"], int(b["bytes"])) for b in data.get("budget", []))
    line = float(data.get("report", {}).get("memory_reduction_line", 3.5))
    return Claims(tuple(groups), budgets, line)


@dataclass
class Evaluation:
    """A criterion's status in a run: pass, fail, skipped or not measured, and the evidence."""

    criterion: Criterion
    status: str
    evidence: list[str] = field(default_factory=list)


def evaluate(criterion: Criterion, runs: RunSet) -> Evaluation:
    """Decide ``criterion`` from the gate verdicts first, then from the matching tests' outcomes."""
    if criterion.metric:
        measured = [v for v in runs.verdicts if v["metric"] == criterion.metric and criterion.matches(v)]
        verdicts = [v for v in measured if v["passed"] is not None]
        if verdicts:
            def meets(v: Mapping[str, Any]) -> bool:
                return bool(v["passed"]) and criterion.meets(v["value"])
            bounds = [f">= {criterion.min:g}" if criterion.min is not None else "",
                      f"<= {criterion.max:g}" if criterion.max is not None else ""]
            claim = f"; the claim: {' and '.join(b for b in bounds if b)}" if any(bounds) else ""
            evidence = [f"{v['case']}: {v['value']:.4g} ({'pass' if meets(v) else 'FAIL'}, {v['gate']}{claim})"
                        for v in verdicts]
            return Evaluation(criterion, "pass" if all(meets(v) for v in verdicts) else "fail", evidence)
        if measured:
            return Evaluation(criterion, "measured, no gate", [f"{v['case']}: {v['value']:.4g}" for v in measured])
    outcomes = [o for o in runs.outcomes if (not criterion.tests or o.get("test") in criterion.tests)
                and criterion.matches(o)]
    if not outcomes:
        return Evaluation(criterion, "not measured", ["no test in these runs measured it"])
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    passed = [o for o in outcomes if o["outcome"] == "passed"]
    if failed:
        return Evaluation(criterion, "fail", [f"{o.get('case', o['nodeid'])}: failed in {o.get('when')}" for o in failed])
    if passed and not criterion.metric:
        evidence = [f"{o.get('case', o['nodeid'])}: passed" for o in passed]
        if criterion.each:
            missing = [v for v in criterion.selectors[criterion.each] if v not in {o.get(criterion.each) for o in passed}]
            if missing:
                gap = f"no passing run at {criterion.each} {', '.join(map(str, missing))}"
                return Evaluation(criterion, "partial", [gap, *evidence])
        return Evaluation(criterion, "pass", evidence)
    reasons = sorted({o.get("reason") or "" for o in outcomes if o["outcome"] == "skipped"})
    if reasons:
        return Evaluation(criterion, "skipped", reasons)
    return Evaluation(criterion, "not measured", ["its tests ran but recorded no gate verdict for it"])
