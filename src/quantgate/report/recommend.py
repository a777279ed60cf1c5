"""Recommendations for production, derived from the measured results only.

Per hardware class and model: the fastest configuration end to end, the smallest transformer,
the fastest configuration that fits each memory budget of fixtures/claims.toml, and the best
throughput at the largest batch measured. Every number quoted comes from the results; if the
runs measured no image quality, the recommendation says so.
"""

from __future__ import annotations

from collections import defaultdict

from quantgate.report.claims import Budget
from quantgate.results import Result, RunSet

GIB = 2**30


def _describe(r: Result, runs: RunSet) -> str:
    speedup = runs.speedup(r, "bf16")
    vs = f", {speedup:.2f}x bf16 eager" if speedup is not None and not (r.scheme == "bf16" and r.variant == "eager") else ""
    return f"{r.scheme} ({r.variant}): {r.median:.3f} s{vs}"


def recommendations(runs: RunSet, budgets: tuple[Budget, ...]) -> list[str]:
    """Sentences, one per (hardware class, model, goal), built from the measured data."""
    lines = []
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in runs.results:
        groups[(r.hardware, r.model)].append(r)
    has_quality = any(v["metric"].startswith("image_") for v in runs.verdicts)
    for (hardware, model), results in sorted(groups.items()):
        where = f"{model} on {hardware}"
        e2e = [r for r in results if r.scope == "end_to_end" and r.batch == 1]
        if e2e:
            fastest = min(e2e, key=lambda r: r.median)
            lines.append(f"{where}, fastest prompt to image (batch 1): {_describe(fastest, runs)}, "
                         f"peak {fastest.peak_allocated / GIB:.1f} GiB." if fastest.peak_allocated else
                         f"{where}, fastest prompt to image (batch 1): {_describe(fastest, runs)}.")
            for budget in budgets:
                fits = [r for r in e2e if r.peak_allocated is not None and r.peak_allocated <= budget.bytes]
                if not fits:
                    if any(r.peak_allocated is not None for r in e2e):
                        lines.append(f"{where}, within {budget.name}: no measured configuration fits.")
                    continue
                best = min(fits, key=lambda r: r.median)
                lines.append(f"{where}, fastest within {budget.name} ({budget.bytes / GIB:.2f} GiB): "
                             f"{_describe(best, runs)}, peak {best.peak_allocated / GIB:.1f} GiB.")
        # Only the plain scopes: a timing with a LoRA loaded (transformer_lora...) is not the scheme's own.
        sized = [r for r in results if r.footprint is not None and r.scope in ("end_to_end", "transformer")]
        if sized:
            smallest = min(sized, key=lambda r: (r.footprint, r.scope != "end_to_end", r.median))
            lines.append(f"{where}, smallest transformer: {smallest.scheme} at {smallest.footprint / GIB:.2f} GiB "
                         f"({smallest.scope.replace('_', ' ')} {smallest.median:.3f} s at batch {smallest.batch}, "
                         f"{smallest.variant}).")
        transformer = [r for r in results if r.scope == "transformer"]
        if transformer:
            top = max(r.batch for r in transformer)
            at_top = [r for r in transformer if r.batch == top]
            best = min(at_top, key=lambda r: r.median)
            lines.append(f"{where}, highest transformer throughput at batch {top}: {best.scheme} ({best.variant}), "
                         f"{best.median / top * 1e3:.1f} ms per image.")
    if lines and not has_quality:
        lines.append("Image quality was not measured in these runs: check quality gates before adopting a scheme.")
    return lines
