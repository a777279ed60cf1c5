"""Join several benchmark JSON files of quantgate runs into one (a matrix split over commands,
sessions or runners), keeping pytest-benchmark's format so its own tools still read it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError
from quantgate.report.runs import SCHEMA_VERSION, load_benchmark_json

_SAME_MACHINE = ("gpu", "hardware_class", "nvidia_driver", "cuda_runtime", "libraries")


def merge_benchmark_json(paths: list[str | Path], allow_mixed_machines: bool = False,
                         allow_missing_shards: bool = False) -> dict[str, Any]:
    """One benchmark JSON holding every benchmark of ``paths``.

    Each benchmark's ``extra_info`` gains ``quantgate_part`` (its file's index) so reruns of
    the same case stay distinguishable. Files from different machines or library versions are
    refused unless ``allow_mixed_machines``. Shards (``--quantgate-shard``) must come from the
    same selection, must not repeat or overlap, and must all be there unless
    ``allow_missing_shards`` (the merged ``quantgate.shards`` says which are missing).
    """
    if not paths:
        raise ValueError("nothing to merge")
    parts = [load_benchmark_json(p) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        for key in _SAME_MACHINE:
            if part["machine_info"].get(key) != first["machine_info"].get(key) and not allow_mixed_machines:
                raise ConfigFileError(path, f"machine_info[{key!r}] differs from {paths[0]}: "
                                      f"{part['machine_info'].get(key)!r} vs {first['machine_info'].get(key)!r} "
                                      "(pass --allow-mixed-machines to merge anyway)")
    merged = copy.deepcopy(first)
    merged["benchmarks"], merged["quantgate"] = [], {
        "version": first["quantgate"].get("version"),
        "schema": SCHEMA_VERSION,
        "parts": [],
        "verdicts": [],
        "releases": [],
        "timeouts": [],
        "outcomes": {},
        "not_generated": {},
    }
    for index, (path, part) in enumerate(zip(paths, parts, strict=True)):
        for bench in part["benchmarks"]:
            bench = copy.deepcopy(bench)
            bench.setdefault("extra_info", {})["quantgate_part"] = index
            merged["benchmarks"].append(bench)
        q = part["quantgate"]
        merged["quantgate"]["parts"].append({
            "file": Path(path).name, "datetime": part.get("datetime"), "commit": part.get("commit_info", {}).get("id"),
            "selection": q.get("selection"), "gates_file": q.get("gates_file"), "gates_sha256": q.get("gates_sha256"),
            **({"interrupted": q["interrupted"]} if q.get("interrupted") else {}),
        })
        merged["quantgate"]["verdicts"] += [{**v, "part": index} for v in q.get("verdicts", [])]
        merged["quantgate"]["releases"] += [{**r, "part": index} for r in q.get("releases", [])]
        merged["quantgate"]["timeouts"] += [{**t, "part": index} for t in q.get("timeouts", [])]
        merged["quantgate"]["outcomes"].update({f"{node} (part {index})": o for node, o in q.get("outcomes", {}).items()})
        for reason, count in (q.get("not_generated") or {}).items():
            merged["quantgate"]["not_generated"][reason] = merged["quantgate"]["not_generated"].get(reason, 0) + count
        if q.get("evaluation"):  # quantgate eval results (report's Evaluation section)
            merged["quantgate"].setdefault("evaluation", []).extend({**e, "part": index} for e in q["evaluation"])
    merged["quantgate"]["selection"] = merged["quantgate"]["parts"][0]["selection"]
    shards = check_shards(paths, parts, allow_missing_shards)
    if shards is not None:
        merged["quantgate"]["shards"] = shards
        # Shards are one run split over runners: their tests are distinct, so keep the nodeids.
        merged["quantgate"]["outcomes"] = {node: {**o, "part": index} for index, part in enumerate(parts)
                                           for node, o in part["quantgate"].get("outcomes", {}).items()}
    return merged


# -- shards (--quantgate-shard) ---------------------------------------------------------------


def check_shards(paths: list[str | Path], parts: list[dict[str, Any]], allow_missing: bool) -> dict[str, Any] | None:
    """What the shards among ``parts`` cover; None when no part is a shard.

    Refuses a mix of sharded and unsharded files, shards of different selections or shard
    counts, a shard given twice, shards sharing a test, and (unless ``allow_missing``) an
    incomplete set.
    """
    infos = [part["quantgate"].get("shard") for part in parts]
    if all(info is None for info in infos):
        return None
    if any(info is None for info in infos):
        unsharded = [str(p) for p, info in zip(paths, infos, strict=True) if info is None]
        raise ConfigFileError(unsharded[0], "not a shard, but other files are (--quantgate-shard): "
                              "merge shards of one run, or unsharded runs, not both")
    first = infos[0]
    seen: dict[int, str] = {}
    owner: dict[str, str] = {}
    for path, info, part in zip(paths, infos, parts, strict=True):
        if (info["count"], info["selection_sha256"]) != (first["count"], first["selection_sha256"]):
            raise ConfigFileError(path, f"shard {info['index']}/{info['count']} of another selection than "
                                  f"{paths[0]} (shard {first['index']}/{first['count']}): the selection's "
                                  "fingerprint differs, so the shards do not split one run")
        if info["index"] in seen:
            raise ConfigFileError(path, f"shard {info['index']}/{info['count']} is also {seen[info['index']]}")
        seen[info["index"]] = str(path)
        for node in part["quantgate"].get("outcomes", {}):
            if node in owner:
                raise ConfigFileError(path, f"{node} also ran in {owner[node]}: shards overlap")
            owner[node] = str(path)
    missing = [i for i in range(1, first["count"] + 1) if i not in seen]
    if missing and not allow_missing:
        names = ", ".join(f"{i}/{first['count']}" for i in missing)
        raise ConfigFileError(paths[0], f"shards {names} "
                              "are missing (pass --allow-missing-shards to merge an incomplete run)")
    return {"count": first["count"], "selection_sha256": first["selection_sha256"],
            "present": sorted(seen), "missing": missing}


# -- xdist workers of one session -------------------------------------------------------------


def merge_worker_runs(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One benchmark JSON from the per-worker JSONs of one xdist session (worker id -> JSON).

    Unlike runs split over commands, the workers ran one session: outcomes keep their nodeids,
    and every benchmark, verdict, release and outcome names the worker (and GPU) it ran on.
    Workers that disagree on the machine (GPU model, driver, libraries) are refused.
    """
    if not parts:
        raise ValueError("no worker sent results")
    ids = sorted(parts, key=lambda w: (len(w), w))
    # A killed worker's partial results (quantgate.plugin.timeouts) carry no full machine_info; they
    # come from this session's own workers, so they are merged without the machine check.
    complete = [w for w in ids if "partial" not in parts[w]["quantgate"]] or ids
    first = parts[complete[0]]
    for worker in complete[1:]:
        for key in _SAME_MACHINE:
            if parts[worker]["machine_info"].get(key) != first["machine_info"].get(key):
                raise ValueError(f"xdist worker {worker} ran on another machine than {ids[0]}: machine_info[{key!r}] "
                                 f"{parts[worker]['machine_info'].get(key)!r} vs {first['machine_info'].get(key)!r}")
    merged = copy.deepcopy(first)
    q = merged["quantgate"] = {k: v for k, v in copy.deepcopy(first["quantgate"]).items() if k != "worker"}
    merged["benchmarks"] = []
    q.update(verdicts=[], artifacts=[], releases=[], timeouts=[], outcomes={}, xdist={"workers": []})
    for worker in ids:
        part = parts[worker]
        info = part["quantgate"].get("worker", {"id": worker, "gpu": None})
        tag = {"worker": info["id"], "gpu": info.get("gpu")}
        for bench in part["benchmarks"]:
            bench = copy.deepcopy(bench)
            bench.setdefault("extra_info", {}).update(quantgate_worker=tag["worker"], quantgate_gpu=tag["gpu"])
            merged["benchmarks"].append(bench)
        pq = part["quantgate"]
        q["verdicts"] += [{**v, **tag} for v in pq.get("verdicts", [])]
        q["artifacts"] += pq.get("artifacts", [])
        q["releases"] += [{**r, **tag} for r in pq.get("releases", [])]
        q["timeouts"] += [{**t, **tag} for t in pq.get("timeouts", [])]
        q["outcomes"].update({node: {**o, **tag} for node, o in pq.get("outcomes", {}).items()})
        q["xdist"]["workers"].append({**tag, "benchmarks": len(part["benchmarks"]),
                                      "tests": len(pq.get("outcomes", {})), "datetime": part.get("datetime"),
                                      **({"killed_in": pq["partial"]["hung_test"]} if "partial" in pq else {})})
    return merged
