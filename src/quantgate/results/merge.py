"""Join several benchmark JSON files of quantgate runs into one (a matrix split over commands,
sessions or runners, or the workers of one xdist session), keeping pytest-benchmark's format so
its own tools still read it; ``load_runs`` reads one file or merges several into a RunSet.

This module imports the reader (``quantgate.results.reader``); the reader never imports it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from quantgate.errors import ConfigFileError
from quantgate.results import schema as qs
from quantgate.results.reader import RunSet, load_benchmark_json, run_set
from quantgate.results.schema import SCHEMA_VERSION, SECTION

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
    merged["benchmarks"], merged[SECTION] = [], {
        qs.VERSION: first[SECTION].get(qs.VERSION),
        qs.SCHEMA: SCHEMA_VERSION,
        qs.PARTS: [],
        qs.VERDICTS: [],
        qs.RELEASES: [],
        qs.TIMEOUTS: [],
        qs.OUTCOMES: {},
        qs.NOT_GENERATED: {},
    }
    mq = merged[SECTION]
    for index, (path, part) in enumerate(zip(paths, parts, strict=True)):
        for bench in part["benchmarks"]:
            bench = copy.deepcopy(bench)
            bench.setdefault("extra_info", {})[qs.PART_KEY] = index
            merged["benchmarks"].append(bench)
        q = part[SECTION]
        mq[qs.PARTS].append({
            "file": Path(path).name, "datetime": part.get("datetime"), "commit": part.get("commit_info", {}).get("id"),
            qs.SELECTION: q.get(qs.SELECTION), qs.GATES_FILE: q.get(qs.GATES_FILE),
            qs.GATES_SHA256: q.get(qs.GATES_SHA256),
            **({qs.INTERRUPTED: q[qs.INTERRUPTED]} if q.get(qs.INTERRUPTED) else {}),
        })
        for key in (qs.VERDICTS, qs.RELEASES, qs.TIMEOUTS):
            mq[key] += [{**record, "part": index} for record in q.get(key, [])]
        mq[qs.OUTCOMES].update({f"{node} (part {index})": o for node, o in q.get(qs.OUTCOMES, {}).items()})
        for reason, count in (q.get(qs.NOT_GENERATED) or {}).items():
            mq[qs.NOT_GENERATED][reason] = mq[qs.NOT_GENERATED].get(reason, 0) + count
        if q.get(qs.EVALUATION):  # quantgate eval results (report's Evaluation section)
            mq.setdefault(qs.EVALUATION, []).extend({**e, "part": index} for e in q[qs.EVALUATION])
    mq[qs.SELECTION] = mq[qs.PARTS][0][qs.SELECTION]
    shards = check_shards(paths, parts, allow_missing_shards)
    if shards is not None:
        mq[qs.SHARDS] = shards
        # Shards are one run split over runners: their tests are distinct, so keep the nodeids.
        mq[qs.OUTCOMES] = {node: {**o, "part": index} for index, part in enumerate(parts)
                           for node, o in part[SECTION].get(qs.OUTCOMES, {}).items()}
    return merged


# -- shards (--quantgate-shard) ---------------------------------------------------------------


def check_shards(paths: list[str | Path], parts: list[dict[str, Any]], allow_missing: bool) -> dict[str, Any] | None:
    """What the shards among ``parts`` cover; None when no part is a shard.

    Refuses a mix of sharded and unsharded files, shards of different selections or shard
    counts, a shard given twice, shards sharing a test, and (unless ``allow_missing``) an
    incomplete set.
    """
    infos = [part[SECTION].get(qs.SHARD) for part in parts]
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
        for node in part[SECTION].get(qs.OUTCOMES, {}):
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
    complete = [w for w in ids if qs.PARTIAL not in parts[w][SECTION]] or ids
    first = parts[complete[0]]
    for worker in complete[1:]:
        for key in _SAME_MACHINE:
            if parts[worker]["machine_info"].get(key) != first["machine_info"].get(key):
                raise ValueError(f"xdist worker {worker} ran on another machine than {ids[0]}: machine_info[{key!r}] "
                                 f"{parts[worker]['machine_info'].get(key)!r} vs {first['machine_info'].get(key)!r}")
    merged = copy.deepcopy(first)
    q = merged[SECTION] = {k: v for k, v in copy.deepcopy(first[SECTION]).items() if k != qs.WORKER}
    merged["benchmarks"] = []
    q.update({qs.VERDICTS: [], qs.ARTIFACTS: [], qs.RELEASES: [], qs.TIMEOUTS: [], qs.OUTCOMES: {},
              qs.XDIST: {"workers": []}})
    for worker in ids:
        part = parts[worker]
        info = part[SECTION].get(qs.WORKER, {"id": worker, "gpu": None})
        tag = {"worker": info["id"], "gpu": info.get("gpu")}
        for bench in part["benchmarks"]:
            bench = copy.deepcopy(bench)
            bench.setdefault("extra_info", {}).update({qs.WORKER_KEY: tag["worker"], qs.GPU_KEY: tag["gpu"]})
            merged["benchmarks"].append(bench)
        pq = part[SECTION]
        for key in (qs.VERDICTS, qs.RELEASES, qs.TIMEOUTS):
            q[key] += [{**record, **tag} for record in pq.get(key, [])]
        q[qs.ARTIFACTS] += pq.get(qs.ARTIFACTS, [])
        q[qs.OUTCOMES].update({node: {**o, **tag} for node, o in pq.get(qs.OUTCOMES, {}).items()})
        q[qs.XDIST]["workers"].append({**tag, "benchmarks": len(part["benchmarks"]),
                                       "tests": len(pq.get(qs.OUTCOMES, {})), "datetime": part.get("datetime"),
                                       **({"killed_in": pq[qs.PARTIAL]["hung_test"]} if qs.PARTIAL in pq else {})})
    return merged


# -- reading ----------------------------------------------------------------------------------


def load_runs(paths: list[str | Path], allow_mixed_machines: bool = False) -> RunSet:
    """Read one benchmark JSON, or merge several (``allow_mixed_machines``: as ``quantgate merge``'s
    flag of that name), into a RunSet."""
    data = load_benchmark_json(paths[0]) if len(paths) == 1 else \
        merge_benchmark_json(list(paths), allow_mixed_machines=allow_mixed_machines)
    return run_set(data, paths)
