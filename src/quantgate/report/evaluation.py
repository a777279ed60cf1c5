"""The report's "Evaluation" section: FID and CLIP score of ``quantgate eval`` runs.

Reads the ``quantgate.evaluation`` list that ``quantgate eval --benchmark-json`` writes. A
metric that was skipped shows its reason; a custom-feature distance (tests only) is not FID
and has no ``value``, so it never appears as one.
"""

from __future__ import annotations

from typing import Any

from quantgate.report.document import Paragraph, Section, Table
from quantgate.results import RunSet


def _metric(entry: dict[str, Any], digits: int) -> str:
    return f"{entry['value']:.{digits}f}" if "value" in entry else "skipped"


def evaluation_section(runs: RunSet) -> Section | None:
    """The section, or None when these runs hold no evaluation."""
    evaluations = runs.data.get("quantgate", {}).get("evaluation") or []
    if not evaluations:
        return None
    rows, classes, reasons = [], [], []
    for e in evaluations:
        case, metrics, gen = e["case"], e["metrics"], e["generation"]
        fid, clip = metrics.get("fid", {}), metrics.get("clip_score", {})
        settings = f"{case['num_inference_steps']} steps, guidance {case['guidance_scale']}, " \
                   f"{case['height']}x{case['width']}"
        fid_cell = _metric(fid, 2) + (f" ({fid['generated']} vs {fid['reference']})" if "value" in fid else "")
        rows.append([case["id"], settings, str(e["images"]), fid_cell, _metric(clip, 4),
                     f"{gen['generated']} new, {gen['reused']} reused"])
        classes.append("pass" if "value" in fid and "value" in clip else "skip")
        reasons += [[f"{case['id']} {name}", m["skipped"]] for name, m in (("FID", fid), ("CLIP score", clip))
                    if "skipped" in m]
    blocks: list = [
        Paragraph("FID (generated vs reference images, torch-fidelity's Inception, lower is better) and CLIP score "
                  "(mean cosine of each image with its caption; torchmetrics' CLIPScore is 100x this) from "
                  "`quantgate eval`. Only runs with the same captions, reference set and image count compare."),
        Table(["case", "settings", "images", "FID", "CLIP score", "this run"], rows, classes)]
    if reasons:
        blocks += [Paragraph("Skipped metrics:"), Table(["metric", "reason"], reasons, ["skip"] * len(reasons))]
    return Section("Evaluation", blocks)
