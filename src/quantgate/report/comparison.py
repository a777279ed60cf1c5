"""``quantgate compare``'s report: a comparison (``quantgate.history.compare``) as a Document,
with trend plots when a history is given."""

from __future__ import annotations

from quantgate.history.compare import (
    HOST_BOUND,
    IMPROVEMENT,
    NO_CHANGE,
    NOT_ENOUGH_DATA,
    REGRESSION,
    Comparison,
    rule,
    summary,
    trends,
)
from quantgate.report import plots
from quantgate.report.document import Bullets, Document, Figure, Paragraph, Section, Table
from quantgate.results import RunSet


def render(comparison: Comparison, history: list[tuple[str, RunSet]] | None = None, title: str = "quantgate compare"):
    """The comparison as a report Document (tables; trend plots when a history is given)."""
    classes = {REGRESSION: "fail", IMPROVEMENT: "pass", NO_CHANGE: "", NOT_ENOUGH_DATA: "skip", HOST_BOUND: "skip"}
    rows = [[f"{c.key[0]} ({c.key[1]})", f"{c.base.median:.4g}", f"{c.new.median:.4g}", f"{c.relative:+.1%}",
             f"{c.rounds[0]} / {c.rounds[1]}", c.verdict, c.decided_by] for c in comparison.times]
    moved = [c for c in comparison.figures if c.base != c.new]
    figure_rows = [[f"{c.key[0]} ({c.key[1]})", c.figure, f"{c.base:.4g}", f"{c.new:.4g}", c.verdict, c.decided_by]
                   for c in moved]
    regressions = comparison.regressions
    sections = [
        Section("Verdict", [Paragraph(
            f"{len(regressions)} regression(s) between {comparison.base_label} and {comparison.new_label}"
            + (": " + "; ".join(f"{c.key[0]} ({c.key[1]})" for c in regressions) if regressions else ".")),
            Paragraph(summary(comparison) + "."), Paragraph(rule(comparison))]),
        Section("Machines", [Bullets(comparison.machine_differences
                                     or ["same GPU, CPU, driver, CUDA, Python, quantgate and libraries"])]),
        Section("Time", [Table(["case (scope)", f"{comparison.base_label} median s", f"{comparison.new_label} median s",
                                "change", "rounds", "verdict", "decided by"], rows,
                               [classes[c.verdict] for c in comparison.times])]),
        Section("Memory and quality", [Table(["case (scope)", "figure", comparison.base_label, comparison.new_label,
                                              "verdict", "decided by"], figure_rows,
                                             [classes[c.verdict] for c in moved])
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
