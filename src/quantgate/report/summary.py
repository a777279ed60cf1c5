"""A Markdown summary of one pytest-benchmark JSON written by a quantgate run.

Every number comes from the JSON: per case the median time with its spread, footprints and
peak memory; then each gate verdict; then the machine and library versions that made it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError

GIB = 2**30


def load_benchmark_json(path: str | Path) -> dict[str, Any]:
    """Read a benchmark JSON; refuse files that quantgate did not write."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigFileError(path, f"cannot read benchmark JSON: {exc}") from None
    if not isinstance(data, dict) or "benchmarks" not in data or "quantgate" not in data:
        raise ConfigFileError(path, "not a benchmark JSON written by a quantgate run "
                              "(pytest --benchmark-json with the quantgate plugin)")
    return data


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def summary_markdown(data: dict[str, Any], title: str = "quantgate run") -> str:
    """The Markdown summary of a quantgate benchmark JSON."""
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lines = [f"# {title}", ""]
    lines.append(f"- device: {machine.get('gpu') or 'CPU'} ({machine.get('hardware_class')}), "
                 f"driver {machine.get('nvidia_driver')}, CUDA {machine.get('cuda_runtime')}")
    libs = machine.get("libraries", {})
    lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v))
    lines.append(f"- commit: {commit.get('id')}{' (dirty)' if commit.get('dirty') else ''}; run at {data.get('datetime')}")
    selection = data["quantgate"].get("selection", {})
    lines.append(f"- timing: {selection.get('rounds')} rounds after {selection.get('warmup_rounds')} warm-up, "
                 "GPU synchronized each round; median with interquartile range (IQR)")
    lines += ["", "## Timings and memory", "",
              "| case | scope | steps | median s | IQR s | min s | transformer GiB | pipeline GiB | peak alloc GiB | peak reserved GiB | load s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for bench in sorted(data["benchmarks"], key=lambda b: (b["extra_info"].get("model", ""), b["name"])):
        e, s = bench["extra_info"], bench["stats"]
        lines.append(
            f"| {e.get('id', bench['name'])} | {e.get('scope')} | {e.get('num_inference_steps')} | {s['median']:.4f} "
            f"| {s['iqr']:.4f} | {s['min']:.4f} | {_gib(e.get('denoiser_footprint_bytes'))} "
            f"| {_gib(e.get('pipeline_footprint_bytes'))} | {_gib(e.get('peak_allocated_bytes'))} "
            f"| {_gib(e.get('peak_reserved_bytes'))} | {e.get('pipeline', {}).get('load_seconds', 'n/a')} |")
    verdicts = data["quantgate"].get("verdicts", [])
    if verdicts:
        lines += ["", "## Gates", "", "| case | metric | measured | required | verdict | gate |", "|---|---|---:|---|---|---|"]
        for v in verdicts:
            bounds = " and ".join(b for b in (f">= {v['min']}" if v["min"] is not None else "",
                                              f"<= {v['max']}" if v["max"] is not None else "") if b)
            lines.append(f"| {v['case']} | {v['metric']} | {v['value']:.4f} | {bounds} | "
                         f"{'pass' if v['passed'] else 'FAIL'} | {v['gate']} |")
    releases = data["quantgate"].get("releases", [])
    if releases:
        lines += ["", "## Memory left allocated after each pipeline was released", "",
                  "| pipeline | bytes | verdict |", "|---|---:|---|"]
        for r in releases:
            verdict = {True: "pass", False: "FAIL", None: "no gate"}[r.get("passed")]
            lines.append(f"| {r['pipeline']} | {r['leaked_bytes']} | {verdict} |")
    skipped = [(node, o["reason"]) for node, o in data["quantgate"].get("outcomes", {}).items()
               if o["outcome"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{node}`: {reason}" for node, reason in skipped]
    return "\n".join(lines) + "\n"
