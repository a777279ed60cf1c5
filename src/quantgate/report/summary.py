"""A Markdown summary of a pytest-benchmark JSON written by quantgate (one run or merged).

Every number comes from the JSON: per scope and case the median time with its spread
(min / IQR / max), the speedups over the eager bf16 and NF4 baselines at the same batch, the
FLOP rate, footprints and peak memory; then each gate verdict, the memory left after each
pipeline, the skips with their reasons, and the machine and versions that made it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError

GIB = 2**30
BASELINES = ("bf16", "bnb-nf4")


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
    return "–" if value is None else f"{value / GIB:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _group(e: dict[str, Any]) -> tuple:
    return (e.get("model"), e.get("source"), e.get("scope"), e.get("batch"), e.get("device"))


def _baselines(benchmarks: list[dict[str, Any]]) -> dict[tuple, dict[str, float]]:
    """Median of each eager baseline per (model, source, scope, batch, device, part)."""
    found: dict[tuple, dict[str, float]] = {}
    for b in benchmarks:
        e = b["extra_info"]
        if e.get("scheme") in BASELINES and e.get("variant") == "eager":
            for part in (e.get("quantgate_part"), None):
                found.setdefault((*_group(e), part), {}).setdefault(e["scheme"], b["stats"]["median"])
    return found


def _speedup(e: dict[str, Any], median: float, baselines: dict[tuple, dict[str, float]], baseline: str) -> str:
    for part in (e.get("quantgate_part"), None):
        base = baselines.get((*_group(e), part), {}).get(baseline)
        if base is not None:
            return f"{base / median:.2f}x"
    return "–"


def summary_markdown(data: dict[str, Any], title: str = "quantgate run") -> str:
    """The Markdown summary of a quantgate benchmark JSON."""
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    q = data["quantgate"]
    lines = [f"# {title}", ""]
    lines.append(f"- device: {machine.get('gpu') or 'CPU'} ({machine.get('hardware_class')}), "
                 f"driver {machine.get('nvidia_driver')}, CUDA {machine.get('cuda_runtime')}")
    libs = machine.get("libraries", {})
    lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v))
    parts = q.get("parts") or [{"commit": commit.get("id"), "datetime": data.get("datetime"),
                                "selection": q.get("selection")}]
    for index, part in enumerate(parts):
        sel = part.get("selection") or {}
        label = f"part {index}: " if len(parts) > 1 else ""
        lines.append(f"- {label}commit {part.get('commit')}, {part.get('datetime')}; {sel.get('rounds')} timed rounds "
                     f"after {sel.get('warmup_rounds')} warm-up and one untimed first call, GPU synchronized each round")
    benchmarks = sorted(data["benchmarks"], key=lambda b: (b["extra_info"].get("scope", ""),
                                                           b["extra_info"].get("model", ""),
                                                           b["extra_info"].get("batch", 0), b["name"]))
    baselines = _baselines(benchmarks)
    for scope in dict.fromkeys(b["extra_info"].get("scope") for b in benchmarks):
        lines += ["", f"## {scope}", "",
                  "| case | median s | min s | IQR s | max s | vs bf16 | vs NF4 | first call s | TFLOP/s | % bf16 peak "
                  "| transformer GiB | peak alloc GiB | peak reserved GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in (b for b in benchmarks if b["extra_info"].get("scope") == scope):
            e, s = b["extra_info"], b["stats"]
            part = f" (part {e['quantgate_part']})" if len(parts) > 1 and "quantgate_part" in e else ""
            fraction = e.get("fraction_of_bf16_peak")
            lines.append(
                f"| {e.get('id', b['name'])}{part} | {s['median']:.4f} | {s['min']:.4f} | {s['iqr']:.4f} "
                f"| {s['max']:.4f} | {_speedup(e, s['median'], baselines, 'bf16')} "
                f"| {_speedup(e, s['median'], baselines, 'bnb-nf4')} | {_num(e.get('first_call_seconds'), '.2f')} "
                f"| {_num(e.get('achieved_tflops'), '.1f')} | {_num(None if fraction is None else 100 * fraction, '.1f')} "
                f"| {_gib(e.get('denoiser_footprint_bytes'))} | {_gib(e.get('peak_allocated_bytes'))} "
                f"| {_gib(e.get('peak_reserved_bytes'))} |")
    peaks = {e.get("bf16_peak_tflops_measured") for e in (b["extra_info"] for b in benchmarks)} - {None}
    if peaks:
        lines += ["", f"Measured dense bf16 matmul peak (8192³, median of 20): {', '.join(f'{p:.0f}' for p in sorted(peaks))} TFLOP/s."]
    verdicts = q.get("verdicts", [])
    if verdicts:
        lines += ["", "## Gates", "", "| case | metric | measured | required | verdict | gate |", "|---|---|---:|---|---|---|"]
        for v in verdicts:
            bounds = " and ".join(b for b in (f">= {v['min']:g}" if v["min"] is not None else "",
                                              f"<= {v['max']:g}" if v["max"] is not None else "") if b)
            lines.append(f"| {v['case']} | {v['metric']} | {v['value']:.4g} | {bounds} | "
                         f"{'pass' if v['passed'] else 'FAIL'} | {v['gate']} |")
    releases = q.get("releases", [])
    if releases:
        lines += ["", "## Memory left allocated after each pipeline was released", "",
                  "| pipeline | bytes | verdict |", "|---|---:|---|"]
        for r in releases:
            verdict = {True: "pass", False: "FAIL", None: "no gate"}[r.get("passed")]
            lines.append(f"| {r['pipeline']} | {r['leaked_bytes']} | {verdict} |")
    skipped = [(node, o["reason"]) for node, o in q.get("outcomes", {}).items() if o["outcome"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{node}`: {reason}" for node, reason in skipped]
    failed = [(node, o.get("when")) for node, o in q.get("outcomes", {}).items() if o["outcome"] == "failed"]
    if failed:
        lines += ["", "## Failed", ""] + [f"- `{node}` (in {when})" for node, when in failed]
    return "\n".join(lines) + "\n"
