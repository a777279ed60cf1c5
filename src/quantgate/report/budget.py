"""The report's "GPU budget" section: which variant each scheme needed to fit, its peak, its
end-to-end latency and its speedup over the offloaded bf16 baseline.

Reads ``quantgate.gpu_budget`` (written by ``--quantgate-gpu-budget``) and the verdicts of
``gpu_budget_fraction_used`` and ``end_to_end_speedup_vs_bf16_offload``. Merged runs keep no
``gpu_budget`` block: their verdicts still fill the table.
"""

from __future__ import annotations

from quantgate.report.document import Paragraph, Section, Table
from quantgate.results import RunSet

GIB = 2**30


def budget_section(runs: RunSet) -> Section | None:
    """The section, or None when these runs measured nothing under a GPU budget."""
    fractions = {v["case"]: v for v in runs.verdicts if v["metric"] == "gpu_budget_fraction_used"}
    if not fractions:
        return None
    state = runs.data.get("quantgate", {}).get("gpu_budget") or {}
    speedups = {v["case"]: v for v in runs.verdicts if v["metric"] == "end_to_end_speedup_vs_bf16_offload"}
    baselines = state.get("offload_baseline_of") or {}
    e2e = {r.case_id: r for r in runs.results if r.scope == "end_to_end"}
    rows, classes = [], []
    for case, v in fractions.items():
        fits = v["value"] <= 1.0
        timing, speedup = e2e.get(case), speedups.get(case)
        rows.append([case, v.get("variant", "–"), f"{v['value']:.3f}", "fits" if fits else "does not fit",
                     "–" if timing is None or timing.peak_reserved is None else f"{timing.peak_reserved / GIB:.2f}",
                     "–" if timing is None else f"{timing.median:.3f}",
                     "–" if speedup is None else f"{speedup['value']:.2f}x vs bf16 {baselines.get(case, 'offload')}"])
        classes.append({True: "pass", False: "fail"}[bool(v["passed"] is not False and fits)])
    budget = state.get("budget") or next((v.get("budget") for v in fractions.values() if v.get("budget")), "?")
    cap = state.get("cap") or {}
    note = f"Budget {budget}"
    if cap:
        note += (f": torch's allocator capped at {cap['allocator_fraction']} of {cap['device_total_bytes'] / GIB:.1f} "
                 f"GiB, {cap['outside_torch_bytes'] / GIB:.2f} GiB held outside torch" if cap.get("allocator_fraction")
                 else f": {cap.get('note')}")
    note += (". Fraction used = (peak reserved by torch over the case, loading included, + memory outside torch) / "
             "budget; the timed peak and median are the end-to-end benchmark's.")
    return Section("GPU budget", [Paragraph(note), Table(
        ["case", "variant", "fraction of budget", "fits", "timed peak reserved GiB", "end-to-end median s",
         "speedup"], rows, classes)])
