"""Spreading a gate run (loaded by ``quantgate.plugin``): xdist workers on their own GPUs, and
shards across runners.

- ``pytest -n N``: each worker is pinned to one GPU (``CUDA_VISIBLE_DEVICES``, from
  ``--quantgate-gpus`` or the controller's visible GPUs) before anything in it initializes
  CUDA. Tests sharing a pipeline carry one ``xdist_group`` and xdist's ``loadgroup`` keeps
  each group on one worker, so every pipeline is built once.
- Timing: pytest-benchmark turns itself off under xdist because parallel workers would time
  each other. With one GPU per worker (and GPU work synchronized) that reason does not hold,
  so the workers run pytest-benchmark normally; each hands its JSON, made by pytest-benchmark's
  own hooks, to the controller through xdist's ``workeroutput``, and the controller writes the
  merged run to ``--benchmark-json`` (and ``--benchmark-save``) in pytest-benchmark's format.
- ``--quantgate-shard i/N``: keeps only the pipeline groups assigned to shard i
  (``quantgate.sharding``); ``quantgate merge`` joins the shards' JSON files and checks them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import pytest

from quantgate.gpus import gpus_for_workers, parse_gpus, visible_gpus
from quantgate.sharding import (
    SPREAD_UNITS,
    assign_shards,
    parse_shard,
    pipeline_group,
    selection_digest,
    spread_unit,
)

_STATE = pytest.StashKey["Distribution"]()
_OUTPUT_KEY = "quantgate_benchmark_json"
HARNESS_GROUP = "(harness)"  # tests without a case: they need no pipeline
# xdist modes that keep an xdist_group on one worker; "load" is turned into "loadgroup"
# (the same for tests without a group), every other mode would split a pipeline's tests.
_KEEPS_GROUPS = ("no", "loadgroup")


class Distribution:
    """What this process knows about how the run is spread."""

    def __init__(self) -> None:
        self.worker: str | None = None
        self.gpu: str | None = None
        self.worker_gpus: list[str | None] = []
        self.gpu_of: dict[str, str] = {}  # (controller) worker id -> its GPU, while it is up
        self.free_gpus: list[str] = []  # GPUs of workers that went down (a replacement takes one)
        self.shard: dict[str, Any] | None = None
        self.original_nodeids: dict[str, str] = {}  # xdist's "nodeid@group" -> nodeid
        self.worker_parts: dict[str, dict[str, Any]] = {}
        self.worker_errors: list[str] = []
        self.messages: list[tuple[str, bool]] = []  # (line, is an error) for the terminal summary


def _state(config: pytest.Config) -> Distribution:
    return config.stash[_STATE]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantgate")
    group.addoption("--quantgate-gpus", dest="quantgate_gpus", default=None, metavar="LIST",
                    help="GPUs for xdist workers, one each in order (as CUDA_VISIBLE_DEVICES takes them; default: "
                         "the visible GPUs); without -n the run uses the first")
    group.addoption("--quantgate-shard", dest="quantgate_shard", default=None, metavar="i/N",
                    help="run only shard i of N (whole pipeline groups, balanced by test count); "
                         "join the shards' JSON files with `quantgate merge`")
    group.addoption("--quantgate-spread-by", dest="quantgate_spread_by", default="pipeline", choices=SPREAD_UNITS,
                    help="what a worker or shard gets whole: pipeline (default: most parallel) or model (every "
                         "scheme of a model, so speedups and session-reference comparisons stay checked)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Pin the GPU before any other plugin's configure could touch CUDA; check the dist mode."""
    state = config.stash[_STATE] = Distribution()
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker")
    shard = config.getoption("quantgate_shard")
    if shard is not None:
        try:
            index, count = parse_shard(shard)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        state.shard = {"index": index, "count": count}
    given = config.getoption("quantgate_gpus")
    try:
        gpus = parse_gpus(given) if given is not None else None
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller chose its GPU
        state.worker = workerinput["workerid"]
        if workerinput.get("quantgate_loadgroup"):
            config.option.loadgroup = True
        _pin(workerinput.get("quantgate_gpu"), state)
        return
    dist = config.getoption("dist", "no")
    if dist == "load":
        config.option.dist = "loadgroup"
    elif dist not in _KEEPS_GROUPS:
        raise pytest.UsageError(f"--dist {dist} would split the tests of one pipeline over several workers "
                                "(each would build it): quantgate runs with --dist loadgroup (the default with -n)")
    workers = len(config.getoption("tx", None) or []) if config.getoption("dist", "no") != "no" else 0
    if workers:
        try:
            state.worker_gpus = gpus_for_workers(gpus if gpus is not None else visible_gpus(), workers,
                                                 given is not None)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    elif gpus:
        _pin(gpus[0], state)


def _pin(gpu: str | None, state: Distribution) -> None:
    if gpu is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise pytest.UsageError(f"cannot pin this process to GPU {gpu}: CUDA was initialized before quantgate's "
                                "plugin was configured (a plugin or conftest touched CUDA at import)")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    state.gpu = gpu


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(controller) Hand each worker its GPU, and the group mode.

    Workers parse the original command line, where ``-n`` alone means ``--dist load``: they
    would not tag nodeids with their group unless told (xdist reads ``option.loadgroup``).
    """
    state = _state(node.config)
    node.workerinput["quantgate_loadgroup"] = node.config.getoption("dist", "no") == "loadgroup"
    if not any(state.worker_gpus):
        return
    match = re.fullmatch(r"gw(\d+)", node.gateway.id)
    index = int(match[1]) if match else len(state.worker_gpus)
    if index < len(state.worker_gpus) and state.worker_gpus[index] not in state.gpu_of.values():
        gpu = state.worker_gpus[index]
    elif state.free_gpus:  # a replacement for a crashed worker takes over its GPU
        gpu = state.free_gpus.pop(0)
    else:
        raise pytest.UsageError(f"xdist worker {node.gateway.id!r} has no GPU of its own "
                                f"(GPUs: {state.worker_gpus}); use -n N, not custom --tx ids")
    state.gpu_of[node.gateway.id] = gpu
    node.workerinput["quantgate_gpu"] = gpu


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """(controller) Schedule whole pipeline groups (see ``quantgate.scheduling``)."""
    if config.getoption("dist", "no") != "loadgroup":
        return None
    from quantgate.cases import plan_cases
    from quantgate.plugin.session import run_of
    from quantgate.scheduling import group_of_nodeid, pipeline_scheduler

    run = run_of(config)
    unit = config.getoption("quantgate_spread_by")
    groups = {case.id: spread_unit(case.pipeline_key, unit)
              for case in plan_cases(run.plan, None, run.selection, run.choose_source)}
    return pipeline_scheduler(config, log, lambda nodeid: group_of_nodeid(nodeid, groups))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect other shards' pipeline groups (after -k/-m, so shards split what is selected)."""
    from quantgate.plugin.session import case_of

    state = _state(config)
    unit = config.getoption("quantgate_spread_by")
    groups: dict[str, int] = {}
    names = []
    for item in items:
        case = case_of(item)
        name = HARNESS_GROUP if case is None else spread_unit(case.pipeline_key, unit)
        suffix = f"@{pipeline_group(case.pipeline_key)}" if case is not None else None
        if suffix is not None and item.nodeid.endswith(suffix):  # xdist's loadgroup renamed it (pytest < 9.2)
            state.original_nodeids[item.nodeid] = item.nodeid[: -len(suffix)]
        groups[name] = groups.get(name, 0) + 1
        names.append(name)
    if state.shard is None:
        return
    index, count = state.shard["index"], state.shard["count"]
    assigned = assign_shards(groups, count)
    keep = [item for item, name in zip(items, names, strict=True) if assigned[name] == index]
    dropped = [item for item, name in zip(items, names, strict=True) if assigned[name] != index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    state.shard.update(selection_sha256=selection_digest(groups), tests=len(keep), selection_tests=len(names),
                       groups=sorted(name for name, shard in assigned.items() if shard == index))



SPREAD_NOTE = ("; spread over {where}, this process holds only its own pipeline groups, and tests that compare "
               "a case with another (speedups, the session's bf16 reference) see the other only when it ran here: "
               "the merged JSON has every median (`quantgate report` computes the speedups); --quantgate-spread-by "
               "model keeps a model's cases together, or give the quality tests a golden set")


def disabled_only_by_xdist(config: pytest.Config) -> bool:
    """Whether pytest-benchmark turned itself off for xdist alone, by its own rule.

    Its rule (5.2 and 5.3 alike): xdist is active (``--dist`` other than ``no``, or this is a
    worker) and the user asked for neither ``--benchmark-skip`` nor ``--benchmark-disable``
    without ``--benchmark-enable``. 5.3 also records it as ``xdist_warning``; 5.2 does not, so
    the rule is evaluated here rather than read from the session.
    """
    xdist_active = config.getoption("dist", "no") != "no" or bool(os.environ.get("PYTEST_XDIST_WORKER"))
    skipped = bool(config.getoption("benchmark_skip", False))
    disabled = bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)
    return xdist_active and not skipped and not disabled


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Let pytest-benchmark time on workers (one GPU each), and write JSON only on the controller."""
    from quantgate.plugin.session import run_of

    state = _state(session.config)
    where = [w for w, on in ((f"xdist worker {state.worker}", state.worker), (
        f"shard {state.shard and state.shard['index']}/{state.shard and state.shard['count']}", state.shard)) if on]
    if where:
        run_of(session.config).spread_note = SPREAD_NOTE.format(where=" and ".join(where))
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not disabled_only_by_xdist(session.config):
        return  # not under xdist, or benchmarks were skipped/disabled on purpose
    if hasattr(bs, "xdist_warning"):  # pytest-benchmark >= 5.3 warns at the end unless cleared
        bs.xdist_warning = False
    if _state(session.config).worker is not None:
        bs.disabled = False
        # The controller writes the merged run; workers must not race on the same files.
        bs.json = None
        bs.save = bs.autosave = None


def pytest_quantgate_json_section(config: pytest.Config, section: dict, output_json: dict) -> None:
    """Say in the JSON which shard and which worker/GPU this is, and undo xdist's nodeid suffix."""
    state = _state(config)
    q = section
    if state.shard is not None or state.worker is not None:
        q["spread_by"] = config.getoption("quantgate_spread_by")
    if state.shard is not None:
        q["shard"] = dict(state.shard)
    if state.worker is not None:
        q["worker"] = {"id": state.worker, "gpu": state.gpu}
    rename = state.original_nodeids
    if rename:
        for bench in output_json.get("benchmarks", []):
            bench["fullname"] = rename.get(bench.get("fullname"), bench.get("fullname"))
        q["outcomes"] = {rename.get(node, node): o for node, o in q.get("outcomes", {}).items()}
        for verdict in q.get("verdicts", []):
            verdict["nodeid"] = rename.get(verdict.get("nodeid"), verdict.get("nodeid"))


def benchmark_json(config: pytest.Config, benchmarks: list) -> dict[str, Any]:
    """The JSON pytest-benchmark writes for ``benchmarks``, made through its own hooks."""
    bs = config._benchmarksession  # type: ignore[attr-defined]
    machine_info = bs.get_machine_info()
    commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
    config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
    output = config.hook.pytest_benchmark_generate_json(config=config, benchmarks=benchmarks, include_data=True,
                                                        machine_info=machine_info, commit_info=commit_info)
    config.hook.pytest_benchmark_update_json(config=config, benchmarks=benchmarks, output_json=output)
    return output


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """(worker) send this worker's JSON to the controller; (controller) write the merged run."""
    config = session.config
    state = config.stash.get(_STATE, None)
    bs = getattr(config, "_benchmarksession", None)
    if state is None or bs is None:
        return
    if state.worker is not None:
        if not bs.disabled:
            # After quantgate.plugin's own sessionfinish released the last pipeline (its leak
            # record belongs in the JSON); xdist sends workeroutput after every sessionfinish.
            config.workeroutput[_OUTPUT_KEY] = json.dumps(benchmark_json(config, bs.benchmarks), default=str)
        return
    if state.worker_parts and (bs.json or bs.save or bs.autosave):
        _write_merged(config, bs, state)
    elif state.shard is not None and bs.json and not bs.benchmarks and not bs.disabled:
        # pytest-benchmark writes nothing without a benchmark; a shard whose tests all skipped
        # still needs its file, or `quantgate merge` would count it as missing.
        from quantgate.atomic import atomic_write_json
        from quantgate.plugin.benchmark_files import benchmark_json_path

        atomic_write_json(benchmark_json_path(bs.json), benchmark_json(config, []))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """(controller) keep what a finished worker sent."""
    output = getattr(node, "workeroutput", {}) or {}
    state = _state(node.config)
    if node.gateway.id in state.gpu_of:
        state.free_gpus.append(state.gpu_of.pop(node.gateway.id))
    if _OUTPUT_KEY in output:
        state.worker_parts[node.gateway.id] = json.loads(output[_OUTPUT_KEY])
    elif error is not None:
        from quantgate.plugin.timeouts import partial_path

        partial = partial_path(node.config, node.gateway.id)  # written if the time budget killed it
        if partial.is_file():
            # What the worker finished before the hang belongs in the run's JSON too.
            try:
                state.worker_parts[node.gateway.id] = json.loads(partial.read_text())
            except (OSError, ValueError) as exc:
                state.worker_errors.append(f"{node.gateway.id}: {error} (its partial results {partial} are "
                                           f"unreadable: {exc})")
            else:
                state.messages.append((f"xdist worker {node.gateway.id} was killed ({error}); what it finished "
                                       f"is merged from its partial results {partial}", True))
        else:
            state.worker_errors.append(f"{node.gateway.id}: {error}")


def _write_merged(config: pytest.Config, bs: Any, state: Distribution) -> None:
    from quantgate.atomic import atomic_write_json
    from quantgate.plugin.benchmark_files import benchmark_json_path
    from quantgate.results.merge import merge_worker_runs

    try:
        merged = merge_worker_runs(state.worker_parts)
    except ValueError as exc:
        state.messages.append((f"benchmark JSON not written: {exc}", True))
        return
    if bs.json:
        atomic_write_json(benchmark_json_path(bs.json), merged)
    name = bs.save or bs.autosave
    if name:
        bs.storage.save(merged, name)
    where = ", ".join(str(p) for p in (bs.json and benchmark_json_path(bs.json), name and bs.storage.location) if p)
    state.messages.append((f"{len(merged['benchmarks'])} benchmarks from {len(state.worker_parts)} xdist workers "
                           f"merged into {where}", False))
    state.messages += [(f"xdist worker {error} sent no results (missing from the JSON)", True)
                       for error in state.worker_errors]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    for line, error in state.messages if state is not None else ():
        terminalreporter.write_line(f"quantgate: {line}", red=error)
