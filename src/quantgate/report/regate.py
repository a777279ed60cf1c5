"""Re-check a finished run's measured values against the gates as they are now (no GPU needed).

A run's JSON keeps every gated and ungated value it measured (``quantgate.verdicts``, with the
case attributes the selectors match on). When ``gates.toml`` changes — a new gate, a tightened
bound — ``quantgate regate RUN.json`` says what that run would get today, so a threshold can be
checked against the GPU evidence already committed before it blocks anyone's merge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantgate.gates import METRICS, GateBook, Verdict, format_value

# The attributes gates.toml selectors match on; a verdict record carries each of them.
SELECTOR_KEYS = ("model", "source", "scheme", "variant", "batch", "hardware")


def gate_vocabulary() -> dict[str, list[Any]]:
    """The valid value of each selector, from the registries (as the plugin checks gates.toml)."""
    from quantgate.hardware import HARDWARE_CLASSES
    from quantgate.models import model_names
    from quantgate.models.sources import SOURCES
    from quantgate.schemes import scheme_names
    from quantgate.variants import VARIANTS

    return {"model": model_names(), "scheme": scheme_names(), "source": list(SOURCES),
            "variant": list(VARIANTS), "hardware": list(HARDWARE_CLASSES)}


def load_gates(path: str | Path) -> GateBook:
    """``path`` read and validated as the plugin does."""
    return GateBook.load(path, gate_vocabulary())


def case_attrs(record: Mapping[str, Any], vocabulary: Mapping[str, list[Any]]) -> dict[str, Any] | None:
    """The selector attributes of a verdict record: its own fields, or (runs before they were
    recorded) read from its case id ``{model}-{source}-{scheme}-{variant}-b{batch}-{device}``."""
    if all(key in record for key in SELECTOR_KEYS):
        return {key: record[key] for key in SELECTOR_KEYS}
    case = record.get("case", "")
    for model in vocabulary["model"]:
        for source in vocabulary["source"]:
            prefix = f"{model}-{source}-"
            if not case.startswith(prefix):
                continue
            for scheme in vocabulary["scheme"]:
                for variant in vocabulary["variant"]:
                    found = re.fullmatch(rf"{re.escape(scheme)}-{re.escape(variant)}-b(\d+)-\w+", case[len(prefix):])
                    if found:
                        return {"model": model, "source": source, "scheme": scheme, "variant": variant,
                                "batch": int(found.group(1)), "hardware": record.get("hardware")}
    return None


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
    vocabulary = gate_vocabulary()
    for record in data.get("quantgate", {}).get("verdicts", []):
        metric = record.get("metric")
        if metric not in METRICS:
            continue  # a metric this quantgate does not know (an older or newer run): nothing to check
        attrs = case_attrs(record, vocabulary)
        if attrs is None:
            continue  # a case id this quantgate cannot read (another registry): nothing to match
        gate = book.lookup(metric, attrs)
        value = float(record["value"])
        rows.append(Recheck(run=label, nodeid=record.get("nodeid", ""), case=record.get("case", ""),
                            metric=metric, value=value, then_passed=record.get("passed"),
                            then_gate=record.get("gate"),
                            now=gate.check(value, subject=record.get("case", "")) if gate else None))
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
