"""Join several benchmark JSON files of quantgate runs into one (a matrix split over commands,
sessions or runners), keeping pytest-benchmark's format so its own tools still read it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError
from quantgate.report.runs import load_benchmark_json

_SAME_MACHINE = ("gpu", "hardware_class", "nvidia_driver", "cuda_runtime", "libraries")


def merge_benchmark_json(paths: list[str | Path], allow_mixed_machines: bool = False) -> dict[str, Any]:
    """One benchmark JSON holding every benchmark of ``paths``.

    Each benchmark's ``extra_info`` gains ``quantgate_part`` (its file's index) so reruns of
    the same case stay distinguishable. Files from different machines or library versions are
    refused unless ``allow_mixed_machines``.
    """
    if not paths:
        raise ValueError("nothing to merge")
    parts = [load_benchmark_json(p) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        for key in _SAME_MACHINE:
            if part["machine_info"].get(key) != first["machine_info"].get(key) and not allow_mixed_machines:
                raise ConfigFileError(path, f"machine_info[{key!r}] differs from {paths[0]}: "
                                      f"{part['machine_info'].get(key)!r} vs {first['machine_info'].get(key)!r} "
                                      "(pass --allow-mixed-machines to merge anyway)")
    merged = copy.deepcopy(first)
    merged["benchmarks"], merged["quantgate"] = [], {
        "version": first["quantgate"].get("version"),
        "parts": [],
        "verdicts": [],
        "releases": [],
        "outcomes": {},
    }
    for index, (path, part) in enumerate(zip(paths, parts)):
        for bench in part["benchmarks"]:
            bench = copy.deepcopy(bench)
            bench.setdefault("extra_info", {})["quantgate_part"] = index
            merged["benchmarks"].append(bench)
        q = part["quantgate"]
        merged["quantgate"]["parts"].append({
            "file": Path(path).name, "datetime": part.get("datetime"), "commit": part.get("commit_info", {}).get("id"),
            "selection": q.get("selection"), "gates_file": q.get("gates_file"), "gates_sha256": q.get("gates_sha256"),
        })
        merged["quantgate"]["verdicts"] += [{**v, "part": index} for v in q.get("verdicts", [])]
        merged["quantgate"]["releases"] += [{**r, "part": index} for r in q.get("releases", [])]
        merged["quantgate"]["outcomes"].update({f"{node} (part {index})": o for node, o in q.get("outcomes", {}).items()})
        if q.get("evaluation"):  # quantgate eval results (report's Evaluation section)
            merged["quantgate"].setdefault("evaluation", []).extend({**e, "part": index} for e in q["evaluation"])
    merged["quantgate"]["selection"] = merged["quantgate"]["parts"][0]["selection"]
    return merged
