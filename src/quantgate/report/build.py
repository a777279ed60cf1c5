"""Assemble the report of one or more quantgate runs: checklist, recommendations, performance
matrix, memory, batch scaling, quality, gates, skips. Every number comes from the JSON."""

from __future__ import annotations

import base64
from collections import defaultdict
from pathlib import Path
from typing import Any

from quantgate.gates import METRICS, format_value
from quantgate.report import plots
from quantgate.report.budget import budget_section
from quantgate.report.claims import Claims, evaluate
from quantgate.report.document import Bullets, Document, Figure, Image, Paragraph, Section, Table
from quantgate.report.evaluation import evaluation_section
from quantgate.report.recommend import recommendations
from quantgate.results import Result, RunSet

GIB = 2**30
STATUS_CLASS = {"pass": "pass", "fail": "fail", "skipped": "skip", "not measured": "skip", "partial": "skip",
                "measured, no gate": "skip"}
QUALITY_METRICS = ("image_psnr_db_vs_reference", "image_ssim_vs_reference", "transformer_output_relative_error_vs_bf16")


def _gib(value: int | None) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _run_section(runs: RunSet) -> Section:
    m = runs.machine
    libs = ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items() if v)
    items = [f"device: {m.get('gpu') or 'CPU'} ({m.get('hardware_class')}), NVIDIA driver {m.get('nvidia_driver')}, "
             f"CUDA {m.get('cuda_runtime')}", f"libraries: {libs}"]
    for index, part in enumerate(runs.parts):
        sel = part.get("selection") or {}
        items.append(f"part {index}: commit {part.get('commit')}, {part.get('datetime')}, {sel.get('rounds')} timed "
                     f"rounds after {sel.get('warmup_rounds')} warm-up round(s) and one untimed first call; models "
                     f"{', '.join(sel.get('models') or [])}; variants {', '.join(sel.get('variants') or [])}; "
                     f"batches {', '.join(map(str, sel.get('batches') or []))}")
    peaks = sorted({r.extra.get("bf16_peak_tflops_measured") for r in runs.results} - {None})
    if peaks:
        items.append("measured dense bf16 matmul rate (8192x8192x8192, median of 20): "
                     + ", ".join(f"{p:.0f}" for p in peaks) + " TFLOP/s")
    blocks: list[Any] = []
    for stop in runs.interrupted:
        blocks.append(Paragraph(f"INTERRUPTED: {stop.get('file')} was stopped (Ctrl-C) in {stop.get('in_test')} after "
                                f"{stop.get('finished_tests')} tests; what follows is partial."))
    return Section("Run", [*blocks, Bullets(items)])


def _checklist(runs: RunSet, claims: Claims) -> Section:
    blocks = []
    for plan in claims.groups:
        rows, classes = [], []
        for criterion in plan.criteria:
            result = evaluate(criterion, runs)
            rows.append([criterion.claim, result.status, "; ".join(result.evidence[:6])
                         + (f"; and {len(result.evidence) - 6} more" if len(result.evidence) > 6 else "")])
            classes.append(STATUS_CLASS[result.status])
        blocks += [Paragraph(plan.name), Table(["criterion", "status", "evidence"], rows, classes)]
    return Section("Success criteria", blocks)


def _performance(runs: RunSet) -> Section:
    blocks = []
    for scope in ("end_to_end", "transformer"):
        chosen = [r for r in runs.results if r.scope == scope]
        if not chosen:
            continue
        groups: dict[tuple, list[Result]] = defaultdict(list)
        for r in chosen:
            groups[(r.model, r.source, r.batch, r.device)].append(r)
        for (model, source, batch, device), results in sorted(groups.items()):
            rows = []
            for r in sorted(results, key=lambda r: (r.scheme, r.variant, r.part)):
                rows.append([r.label + (f" (part {r.part})" if len(runs.parts) > 1 else ""), f"{r.median:.4f}",
                             f"{r.iqr:.4f}", f"{r.min:.4f} – {r.max:.4f}", _x(runs.speedup(r, "bf16")),
                             _x(runs.speedup(r, "bnb-nf4")), "–" if r.tflops is None else f"{r.tflops:.1f}",
                             "–" if r.peak_fraction is None else f"{100 * r.peak_fraction:.1f}%",
                             "–" if r.first_call_s is None else f"{r.first_call_s:.2f}"])
            blocks += [Paragraph(f"{scope.replace('_', ' ')}: {model} ({source}), batch {batch}, {device}"),
                       Table(["scheme / variant", "median s", "IQR s", "min – max s", "vs bf16 eager",
                              "vs NF4 eager", "TFLOP/s", "of bf16 peak", "first call s"], rows)]
            staged = _stages(results)
            if staged is not None:
                blocks.append(staged)
        svg = plots.latency_bars(runs.results, scope)
        if svg:
            blocks.append(Figure(svg, f"{scope.replace('_', ' ')}: median time per call at the smallest batch, "
                                      "IQR as error bars; compiled variants in green"))
    return Section("Performance", blocks or [Paragraph("No timings in these runs.")])


def _stages(results: list[Result]) -> Table | None:
    """Where one untimed prompt-to-image call spent its time (``extra_info.stages``), per case."""
    rows = []
    for r in sorted(results, key=lambda r: (r.scheme, r.variant, r.part)):
        stages = r.extra.get("stages")
        if not stages or not stages.get("wall_s"):
            continue
        steps = stages.get("denoising_steps_s") or []
        per_step = f"{1e3 * sum(steps) / len(steps):.1f}" if steps else "–"
        rows.append([r.label, f"{stages['text_encoding_s']:.4f}", f"{stages['denoising_s']:.4f}",
                     f"{stages.get('steps', len(steps))} x {per_step}", f"{stages['vae_decode_s']:.4f}",
                     f"{stages['other_s']:.4f}", f"{stages['wall_s']:.4f}"])
    if not rows:
        return None
    return Table(["stages of one call", "text encoding s", "denoising s", "steps x ms", "VAE decode s", "other s",
                  "wall s"], rows)


def _memory(runs: RunSet, claims: Claims) -> Section:
    rows = []
    seen = set()
    for r in sorted(runs.results, key=lambda r: (r.model, r.scheme, r.variant, r.batch)):
        if r.scope != "end_to_end" or (r.model, r.scheme, r.variant, r.batch) in seen:
            continue
        seen.add((r.model, r.scheme, r.variant, r.batch))
        reference = r.extra.get("pipeline", {}).get("denoiser_bf16_reference_bytes")
        rows.append([r.model, r.label, str(r.batch), _gib(r.footprint),
                     _x(reference / r.footprint if reference and r.footprint else None), _gib(r.pipeline_footprint),
                     _gib(r.peak_allocated), _gib(r.peak_reserved)])
    blocks = [Table(["model", "scheme / variant", "batch", "transformer GiB", "reduction vs bf16", "pipeline GiB",
                     "peak allocated GiB", "peak reserved GiB"], rows)] if rows else []
    svg = plots.memory_bars(runs.results, claims.memory_reduction_line)
    if svg:
        blocks.append(Figure(svg, f"transformer footprint and peak memory of prompt to image (eager, smallest batch); "
                                  f"dashed: bf16 footprint / {claims.memory_reduction_line:g}"))
    return Section("Memory", blocks or [Paragraph("No end-to-end runs in these runs.")])


def _batch_scaling(runs: RunSet) -> Section:
    svg = plots.batch_scaling(runs.results)
    if svg is None:
        return Section("Batch scaling", [Paragraph("No scheme was measured at more than one batch size.")])
    return Section("Batch scaling", [Figure(svg, "transformer forward: milliseconds per image against batch size; "
                                                 "error bars: IQR")])


def _quality(runs: RunSet) -> Section:
    values: dict[str, dict[str, dict]] = defaultdict(dict)
    for v in runs.verdicts:
        if v["metric"] in QUALITY_METRICS:
            values[v["case"]].setdefault(v["metric"], v)
    blocks: list = []
    if values:
        rows, classes = [], []
        for case, metrics in sorted(values.items()):
            cells = [("–" if m not in metrics else format_value(metrics[m]["value"], METRICS[m].unit))
                     for m in QUALITY_METRICS]
            states = [metrics[m]["passed"] for m in metrics]
            verdict = "FAIL" if False in states else ("pass" if True in states else "no gate")
            rows.append([case, *cells, verdict])
            classes.append({"FAIL": "fail", "pass": "pass", "no gate": "skip"}[verdict])
        blocks.append(Table(["case", "PSNR vs reference", "SSIM vs reference", "transformer rel. error vs bf16",
                             "verdict"], rows, classes))
    for artifact in runs.artifacts:
        path = runs.artifact_file(artifact) if artifact.get("kind") == "sample_grid" else None
        if path is not None:
            data = base64.b64encode(path.read_bytes()).decode()
            blocks.append(Image(f"data:image/png;base64,{data}",
                                f"{artifact['model']} ({artifact['source']}, {artifact['device']}): one row per prompt; "
                                f"columns {', '.join(artifact['columns'])}"))
    if not blocks:
        blocks.append(Paragraph("These runs measured no image quality (no PSNR, SSIM or relative error against a "
                                "reference), so there are no sample grids either."))
    elif any(r.source == "synthetic" for r in runs.results):
        blocks.insert(0, Paragraph("With synthetic weights the images are not meaningful: only the numerical "
                                   "comparison against the bf16 reference of the same weights applies."))
    return Section("Quality", blocks)


def _gates(runs: RunSet) -> Section:
    rows, classes = [], []
    for v in runs.verdicts:
        unit = METRICS[v["metric"]].unit if v["metric"] in METRICS else ""
        bounds = " and ".join(b for b in (f">= {format_value(v['min'], unit)}" if v["min"] is not None else "",
                                          f"<= {format_value(v['max'], unit)}" if v["max"] is not None else "") if b)
        verdict = {True: "pass", False: "FAIL", None: "no gate"}[v["passed"]]
        rows.append([v["case"], v["metric"], format_value(v["value"], unit), bounds or "–", verdict,
                     v["gate"] or "–", v.get("why") or "measured, no gate in fixtures/gates"])
        classes.append({True: "pass", False: "fail", None: "skip"}[v["passed"]])
    if not rows:
        return Section("Gates", [Paragraph("No gate was checked in these runs.")])
    checked = [v for v in runs.verdicts if v["passed"] is not None]
    passed = sum(v["passed"] is True for v in checked)
    return Section("Gates", [Paragraph(f"{passed} of {len(checked)} gate checks passed; "
                                       f"{len(rows) - len(checked)} values were measured without a gate."),
                             Table(["case", "metric", "measured", "required", "verdict", "gate", "why"], rows, classes)])


def _skips(runs: RunSet) -> Section:
    rows, classes = [], []
    for o in runs.outcomes:
        if o["outcome"] in ("skipped", "failed"):
            rows.append([o["nodeid"], o["outcome"], o.get("reason") or f"failed in {o.get('when')}"])
            classes.append("skip" if o["outcome"] == "skipped" else "fail")
    leaks = [[r["pipeline"] + (" (load failed)" if r.get("failed_load") else ""), r.get("last_test") or "–",
              f"{r['leaked_bytes'] / 2**20:.1f} MiB", {True: "pass", False: "FAIL", None: "no gate"}[r.get("passed")]]
             for r in runs.releases]
    blocks = [Table(["test", "outcome", "reason"], rows, classes)] if rows else [Paragraph("Nothing skipped or failed.")]
    if runs.not_generated:
        blocks += [Paragraph(f"Not generated: {sum(runs.not_generated.values())} (test, case) pairs that cannot run "
                             "on this machine or cannot apply to their scheme:"),
                   Table(["reason", "pairs"], [[reason, str(count)] for reason, count in
                                               sorted(runs.not_generated.items(), key=lambda kv: -kv[1])])]
    if runs.timeouts:
        blocks += [Paragraph("Tests stopped for exceeding their time budget (--quantgate-case-timeout):"),
                   Table(["test", "case", "limit", "budget", "stopped after"],
                         [[t["nodeid"], t.get("case") or "–", {"soft": "failed (soft)", "hard": "killed (hard)"}.get(
                             t["kind"], t["kind"]), f"{t['budget_s']:g} s", f"{t['elapsed_s']:g} s"]
                          for t in runs.timeouts], ["fail"] * len(runs.timeouts))]
    if leaks:
        blocks += [Paragraph("GPU memory still allocated after each pipeline group was released, above what was "
                             "allocated before it loaded (the last test of the group named):"),
                   Table(["pipeline", "last test", "left allocated", "verdict"], leaks)]
    return Section("Skipped, failed and left behind", blocks)


def build_report(runs: RunSet, claims: Claims, title: str) -> Document:
    """The report document of ``runs``."""
    return Document(title, [
        _run_section(runs),
        _checklist(runs, claims),
        Section("Recommendations", [Bullets(recommendations(runs, claims.budgets) or ["No results to recommend from."])]),
        _performance(runs),
        _memory(runs, claims),
        _batch_scaling(runs),
        _quality(runs),
        *[s for s in (evaluation_section(runs),) if s is not None],  # quantgate eval results, when present
        *[s for s in (budget_section(runs),) if s is not None],  # runs under --quantgate-gpu-budget
        _gates(runs),
        _skips(runs),
    ])


def write_report(runs: RunSet, claims: Claims, title: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (atomically)."""
    from quantgate.atomic import atomic_write_text
    from quantgate.report.document import to_html, to_markdown

    doc = build_report(runs, claims, title)
    out_dir = Path(out_dir)
    return (atomic_write_text(out_dir / "report.html", to_html(doc)),
            atomic_write_text(out_dir / "report.md", to_markdown(doc)))
