"""Re-check a finished run's measured values against the gates as they are now (no GPU needed).

A run's JSON keeps every gated and ungated value it measured (``quantgate.verdicts``, with the
case attributes the selectors match on). When the gates (``fixtures/gates/``) change — a new gate, a tightened
bound — ``quantgate regate RUN.json`` says what that run would get today, so a threshold can be
checked against the GPU evidence already committed before it blocks anyone's merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantgate.cases import selector_vocabulary
from quantgate.gates import METRICS, SELECTORS, GateBook, Verdict, format_value
from quantgate.results.reader import complete_verdicts
from quantgate.results.schema import SECTION, VERDICTS

# The case attributes every verdict record carries; a record also carries the session's
# ``budget`` when it ran under --quantgate-gpu-budget (the other selector of the gates).
SELECTOR_KEYS = ("model", "source", "scheme", "variant", "batch", "hardware")


def load_gates(path: str | Path) -> GateBook:
    """``path`` read and validated as the plugin does."""
    return GateBook.load(path, selector_vocabulary(), option="--gates")


@dataclass(frozen=True)
class Recheck:
    """One recorded value: what the run said then and what the current gates say."""

    run: str
    nodeid: str
    case: str
    metric: str
    value: float
    then_passed: bool | None  # None: there was no gate
    then_gate: str | None
    now: Verdict | None  # None: no gate matches now

    @property
    def now_passed(self) -> bool | None:
        return None if self.now is None else self.now.passed

    @property
    def changed(self) -> bool:
        then_where = self.then_gate if self.then_passed is not None else None
        now_where = self.now.gate.where if self.now is not None else None
        return self.then_passed != self.now_passed or (then_where is None) != (now_where is None)


def recheck_run(label: str, data: Mapping[str, Any], book: GateBook) -> list[Recheck]:
    """Every value in ``data['quantgate']['verdicts']`` checked against ``book``."""
    rows = []
    for record in complete_verdicts(data.get(SECTION, {}).get(VERDICTS, [])):
        metric = record.get("metric")
        if metric not in METRICS:
            continue  # a metric this quantgate does not know (an older or newer run): nothing to check
        if not all(key in record for key in SELECTOR_KEYS):
            continue  # a case id this quantgate cannot read (another registry): nothing to match
        gate = book.lookup(metric, {key: record[key] for key in SELECTORS if key in record})
        value = float(record["value"])
        ci95 = tuple(record["ci95"]) if record.get("ci95") else None  # runs since 2026-12: a speedup's interval
        rows.append(Recheck(run=label, nodeid=record.get("nodeid", ""), case=record.get("case", ""),
                            metric=metric, value=value, then_passed=record.get("passed"),
                            then_gate=record.get("gate"),
                            now=gate.check(value, subject=record.get("case", ""), ci95=ci95) if gate else None))
    return rows


def _state(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "no gate"}[passed]


def as_text(rows: Iterable[Recheck], changed_only: bool = False) -> str:
    """One line per value (or per changed value), then the counts."""
    rows = list(rows)
    lines = []
    for row in rows:
        if changed_only and not row.changed:
            continue
        unit = METRICS[row.metric].unit
        required = row.now.gate.requirement() + f" [{row.now.gate.where}]" if row.now else "-"
        lines.append(f"{_state(row.now_passed):7s} {row.case} {row.metric}: measured {format_value(row.value, unit)}, "
                     f"required {required} (recorded: {_state(row.then_passed)})")
    counts = {state: sum(_state(r.now_passed) == state for r in rows) for state in ("pass", "FAIL", "no gate")}
    changed = sum(r.changed for r in rows)
    lines.append(f"{len(rows)} recorded value{'' if len(rows) == 1 else 's'}: {counts['pass']} pass, {counts['FAIL']} fail, "
                 f"{counts['no gate']} without a gate under the current gates; {changed} differ from the run's own verdicts")
    return "\n".join(lines) + "\n"


def exit_code(rows: Iterable[Recheck]) -> int:
    """1 if any recorded value fails a current gate, else 0."""
    return int(any(r.now_passed is False for r in rows))
