"""Benchmark JSON files of quantgate runs, read into results a report or a comparison uses.

One file is read here (``load_benchmark_json``, then ``run_set``); several are merged first by
``quantgate.results.merge`` (its ``load_runs``), which imports this module, never the reverse.
Older files (before verdicts and outcomes carried their case's attributes) are completed from
the benchmarks of the same case id, and verdicts without one from the case id itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError
from quantgate.results import schema as qs
from quantgate.results.schema import CASE_FIELDS, SCHEMA_VERSION, SECTION

__all__ = ["CASE_FIELDS", "SCHEMA_VERSION", "Result", "RunSet", "complete_verdicts", "load_benchmark_json",
           "raw_rounds", "result_from_benchmark", "run_set"]


def load_benchmark_json(path: str | Path) -> dict[str, Any]:
    """Read a benchmark JSON; refuse files that quantgate did not write or cannot read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigFileError(path, f"cannot read benchmark JSON: {exc}") from None
    if not raw.strip():
        raise ConfigFileError(path, "is empty, not a benchmark JSON (an interrupted run or a wrong path?)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, f"not a JSON file (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigFileError(path, f"not valid JSON ({exc.msg})", line=exc.lineno) from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ConfigFileError(path, "not a pytest-benchmark JSON (no 'benchmarks' list): give the file of "
                              "pytest --benchmark-json, run with the quantgate plugin")
    if not isinstance(data.get(SECTION), dict):
        raise ConfigFileError(path, "a pytest-benchmark JSON without a 'quantgate' section: not a benchmark "
                              "JSON written by a quantgate run (pytest --benchmark-json with the quantgate plugin)")
    schema = data[SECTION].get(qs.SCHEMA, 1)
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        from quantgate import __version__

        raise ConfigFileError(path, f"written by quantgate {data[SECTION].get(qs.VERSION)} with result schema "
                              f"{schema!r}; this quantgate ({__version__}) reads schema {SCHEMA_VERSION} and older: "
                              "use the quantgate version that wrote it")
    if not isinstance(data.get("machine_info", {}), dict):
        raise ConfigFileError(path, "'machine_info' is not an object: not a pytest-benchmark JSON")
    data.setdefault("machine_info", {})
    return data


@dataclass(frozen=True)
class Result:
    """One timed scope of one case, as recorded."""

    part: int
    name: str
    case_id: str
    scope: str
    model: str
    source: str
    scheme: str
    variant: str
    batch: int
    device: str
    hardware: str
    steps: int | None
    median: float
    min: float
    max: float
    iqr: float
    q1: float
    q3: float
    stddev: float
    rounds: int
    first_call_s: float | None
    flops: int | None
    tflops: float | None
    peak_fraction: float | None
    footprint: int | None
    pipeline_footprint: int | None
    peak_allocated: int | None
    peak_reserved: int | None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Each timed round's seconds (``raw_rounds``); empty when the JSON kept none.
    round_times: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.scheme} {self.variant}"

    def attrs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*CASE_FIELDS, "hardware", "scope")}


def _seconds(values: Any) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        return ()
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
        return ()
    return tuple(float(v) for v in values)


def raw_rounds(bench: dict[str, Any]) -> tuple[float, ...]:
    """The seconds of each timed round of one benchmark entry: pytest-benchmark's ``stats.data``
    (``--benchmark-json`` always writes it; an autosave only with ``--benchmark-save-data``), else
    quantgate's ``extra_info.round_seconds``; empty when neither holds a list of seconds."""
    return _seconds((bench.get("stats") or {}).get("data")) or _seconds((bench.get("extra_info") or {}).get("round_seconds"))


def result_from_benchmark(bench: dict[str, Any], part: int = 0) -> Result | None:
    """A Result from one pytest-benchmark entry; None for benchmarks quantgate did not write."""
    e, s = bench.get("extra_info", {}), bench["stats"]
    if "scope" not in e or "model" not in e:
        return None
    return Result(
        part=e.get(qs.PART_KEY, part), name=bench.get("fullname", bench["name"]), case_id=e.get("id", bench["name"]),
        scope=e["scope"], model=e["model"], source=e.get("source", ""), scheme=e.get("scheme", ""),
        variant=e.get("variant", ""), batch=int(e.get("batch", 1)), device=e.get("device", ""),
        hardware=e.get("hardware", ""), steps=e.get("num_inference_steps"), median=s["median"], min=s["min"],
        max=s["max"], iqr=s["iqr"], q1=s.get("q1", s["median"]), q3=s.get("q3", s["median"]), stddev=s["stddev"],
        rounds=s["rounds"], first_call_s=e.get("first_call_seconds"),
        flops=e.get("denoiser_flops_per_call"), tflops=e.get("achieved_tflops"),
        peak_fraction=e.get("fraction_of_bf16_peak"), footprint=e.get("denoiser_footprint_bytes"),
        pipeline_footprint=e.get("pipeline_footprint_bytes"), peak_allocated=e.get("peak_allocated_bytes"),
        peak_reserved=e.get("peak_reserved_bytes"), extra=e, round_times=raw_rounds(bench),
    )


@dataclass
class RunSet:
    """One or more runs (merged), ready for a report."""

    data: dict[str, Any]
    results: list[Result]
    verdicts: list[dict[str, Any]]
    outcomes: list[dict[str, Any]]
    releases: list[dict[str, Any]]
    parts: list[dict[str, Any]]
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    base_dir: Path = Path(".")
    timeouts: list[dict[str, Any]] = field(default_factory=list)  # tests over their time budget
    not_generated: dict[str, int] = field(default_factory=dict)  # (test, case) pairs left out, by reason
    interrupted: list[dict[str, Any]] = field(default_factory=list)  # parts stopped by Ctrl-C (their tests, files)

    def artifact_file(self, artifact: dict[str, Any]) -> Path | None:
        """The artifact's file: where the run wrote it, else beside the JSON (copied with it)."""
        recorded = Path(artifact["path"])
        for candidate in (recorded, self.base_dir / recorded.name):
            if candidate.is_file():
                return candidate
        return None

    @property
    def machine(self) -> dict[str, Any]:
        return self.data.get("machine_info", {})

    def baseline(self, result: Result, scheme: str, variant: str = "eager") -> Result | None:
        """The ``scheme``/``variant`` result with the same model, source, scope, batch and device
        (from the same part when there is one)."""
        candidates = [r for r in self.results if r.scheme == scheme and r.variant == variant and
                      (r.model, r.source, r.scope, r.batch, r.device) ==
                      (result.model, result.source, result.scope, result.batch, result.device)]
        same_part = [r for r in candidates if r.part == result.part]
        return (same_part or candidates or [None])[0]

    def speedup(self, result: Result, scheme: str) -> float | None:
        base = self.baseline(result, scheme)
        return None if base is None else base.median / result.median


def _case_ids(results: Iterable[Result]) -> dict[str, dict[str, Any]]:
    return {r.case_id: {k: getattr(r, k) for k in CASE_FIELDS} for r in results}


def complete_verdicts(verdicts: Iterable[dict[str, Any]],
                      ids: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Verdict records with their case's attributes: their own where recorded, else those of a
    benchmark of the same case id (``ids``), else read from the case id itself."""
    from quantgate.cases import case_attrs_from_id

    ids = ids or {}
    return [{**(ids.get(v.get("case")) or case_attrs_from_id(v.get("case", "")) or {}), **v} for v in verdicts]


def _node_case(node: str) -> str | None:
    found = re.search(r"\[([^\]]+)\]", node)
    return found.group(1) if found else None


def run_set(data: dict[str, Any], paths: list[str | Path]) -> RunSet:
    """The RunSet of ``data``: one benchmark JSON as ``load_benchmark_json`` returns it, or several
    merged (``quantgate.results.merge``); ``paths`` are the files it came from."""
    results = [r for r in (result_from_benchmark(b) for b in data["benchmarks"]) if r is not None]
    ids = _case_ids(results)
    q = data[SECTION]
    verdicts = complete_verdicts(q.get(qs.VERDICTS, []), ids)
    outcomes = []
    for node, o in q.get(qs.OUTCOMES, {}).items():
        record = {"nodeid": node, **o}
        if "model" not in record:
            case = _node_case(node)
            # a case id ends with the device; parametrized extras (e.g. "-bf16" baselines) follow it
            for case_id, attrs in ids.items():
                if case and case.startswith(case_id):
                    record.update({"case": case_id, **attrs})
                    break
        if "test" not in record:
            record["test"] = node.split("::")[-1].split("[")[0]
        if "hardware" not in record and record.get("device"):  # runs before outcomes carried it
            record["hardware"] = "cpu" if record["device"] == "cpu" else data.get("machine_info", {}).get("hardware_class")
        outcomes.append(record)
    parts = q.get(qs.PARTS) or [{"file": Path(paths[0]).name, "datetime": data.get("datetime"),
                                 "commit": data.get("commit_info", {}).get("id"), "selection": q.get(qs.SELECTION)}]
    return RunSet(data, results, verdicts, outcomes, q.get(qs.RELEASES, []), parts, q.get(qs.ARTIFACTS, []),
                  Path(paths[0]).parent, q.get(qs.TIMEOUTS, []), dict(q.get(qs.NOT_GENERATED) or {}),
                  _interruptions(q, paths))


def _interruptions(q: dict[str, Any], paths: list[str | Path]) -> list[dict[str, Any]]:
    """Where each part of the run was stopped by Ctrl-C (``quantgate.interrupted``), with its file."""
    found = [{**q[qs.INTERRUPTED], "file": str(paths[0])}] if q.get(qs.INTERRUPTED) else []
    return found + [{**p[qs.INTERRUPTED], "file": p.get("file")} for p in q.get(qs.PARTS) or []
                    if p.get(qs.INTERRUPTED)]
