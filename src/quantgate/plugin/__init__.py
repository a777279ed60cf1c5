"""The quantgate pytest plugin: options, markers, case parametrization, fixtures, hooks.

Tests read as the claims they check; the machinery lives here:

- ``case``: parametrized from the model/scheme/source/variant/batch selection (ids such as
  ``flux-schnell-synthetic-bnb-nf4-eager-b1-cuda``), marked ``gpu`` or ``cpu`` and with the
  scheme's backend marker, so ``-m "gpu and torchao"`` selects without reading code.
- ``pipeline``: the loaded pipeline of a case; at most one is held, tests that share it run
  consecutively, and it is released (with a leak check) when the next test needs another.
- ``bench``: times a callable through pytest-benchmark (GPU synchronized, warm-up rounds)
  and records case, footprint and peak memory in ``extra_info``.
- ``gates``: checks a measured value against ``fixtures/gates/``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

from quantgate import applicability, ordering, session_summary
from quantgate.cases import TIERS, Case, plan_cases
from quantgate.errors import QuantgateError
from quantgate.hardware import machine_facts
from quantgate.models import get_model, model_names
from quantgate.plugin import hookspec
from quantgate.plugin.bench import Bench
from quantgate.plugin.fixtures import CaseGates
from quantgate.plugin.options import add_options
from quantgate.plugin.session import _RUN_KEY, QuantgateRun, case_of, check_and_release, release, run_of
from quantgate.schemes import get_scheme, scheme_markers
from quantgate.settings import default_cache_dir
from quantgate.sharding import pipeline_group

# LoRA gates: the --quantgate-lora option and the lora fixtures live in their own plugin module.
# Several GPUs and runners (xdist workers, shards): quantgate.plugin.distribute.
pytest_plugins = ["quantgate.plugin.lora", "quantgate.plugin.distribute", "quantgate.plugin.budget",
                  "quantgate.plugin.cache",
                  # Faults: failed tests drop their frames; the per-case time budget.
                  "quantgate.plugin.isolation", "quantgate.plugin.timeouts",
                  # pytest-benchmark's JSON and saved runs written atomically; offline, weights-only loading.
                  "quantgate.plugin.benchmark_files", "quantgate.plugin.offline",
                  # the fixtures tests take
                  "quantgate.plugin.fixtures"]

BASE_MARKERS = {
    "gpu": "runs on a CUDA GPU (skips with the reason where there is none)",
    "cpu": "the CPU tier: tiny models, runs anywhere",
    "perf": "times something through pytest-benchmark",
    "memory": "measures footprint or peak memory",
    "quality": "compares images or outputs against a reference",
    "lora": "exercises LoRA loading on quantized pipelines",
    "slow": "takes minutes even on a GPU",
    "per_pipeline": "a property of the loaded pipeline: parametrized over the smallest batch only",
    "gpu_only": "a claim about GPUs (speed, GPU memory): parametrized over the GPU tier only",
    "applies": "applies(condition): the (test, case) pairs for which condition(case, params, config) returns a "
               "reason are not generated (quantgate.applicability)",
}


class QuantgateLeakWarning(UserWarning):
    """GPU memory stayed allocated after a pipeline was released.

    Kept for code that filters it by name: a leak over the ``leaked_gpu_bytes`` gate now fails
    the test whose teardown released the pipeline, so nothing issues this warning any more.
    """



def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Declare the hooks sub-plugins implement (``quantgate.plugin.hookspec``)."""
    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


# -- hooks ----------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    markers = dict(BASE_MARKERS)
    markers.update({m: f"cases of the {m} backend" for m in scheme_markers()})
    markers.update({spec.family: f"cases of the {spec.family} model family"
                    for spec in (get_model(n) for n in model_names())})
    markers.update(ordering.ROLE_MARKERS)
    for name, text in markers.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    run = QuantgateRun.from_config(config)
    run.config = config
    config.stash[_RUN_KEY] = run
    config.pluginmanager.register(run, "quantgate-run")
    if config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(_BenchmarkHooks(), "quantgate-benchmark-hooks")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``case`` with the cases the plan selects for this test that can run on this machine."""
    if "case" not in metafunc.fixturenames:
        return
    run = run_of(metafunc.config)
    per_pipeline = metafunc.definition.get_closest_marker("per_pipeline") is not None
    tiers = [t for t in (("gpu",) if metafunc.definition.get_closest_marker("gpu_only") else ("gpu", "cpu"))
             if _tier_selected(metafunc.config, t)]
    params = []
    for case in plan_cases(run.plan, metafunc.function.__name__, run.selection, run.choose_source, tiers=tiers,
                           per_pipeline=per_pipeline):
        if reason := run.cannot_exist(case):
            run.left_out[reason] += 1
            continue
        marks = [getattr(pytest.mark, case.tier), getattr(pytest.mark, get_model(case.model).family)]
        marks += [getattr(pytest.mark, m) for m in get_scheme(case.scheme).markers]
        # xdist's loadgroup keeps tests that share a pipeline on one worker (built once there).
        marks.append(pytest.mark.xdist_group(pipeline_group(case.pipeline_key)))
        params.append(pytest.param(case, id=case.id, marks=marks))
    # No case left: pytest would make one skipped "empty parameter set" test; it is removed at
    # collection (pytest_collection_modifyitems), counted with the reasons above.
    metafunc.parametrize("case", params)


def _tier_selected(config: pytest.Config, tier: str) -> bool:
    """Whether ``-m`` can select cases of ``tier`` (``-m gpu`` generates no CPU-tier cases, so
    nothing is counted as left out there). Other marker names are tried all true and all false."""
    expression = config.getoption("markexpr", "") or ""
    if not expression:
        return True
    from _pytest.mark.expression import Expression

    try:
        compiled = Expression.compile(expression)
    except Exception:  # noqa: BLE001 - pytest reports a bad -m expression itself
        return True
    return any(compiled.evaluate(lambda name, *_, others=others, **__: name == tier if name in TIERS else others)
               for others in (True, False))


def _without_cases(item: pytest.Item) -> bool:
    """A test taking ``case`` that the plan gave no case here (pytest's empty parameter set)."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "case" in callspec.params and not isinstance(callspec.params["case"], Case)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the (test, case) pairs that cannot apply (``quantgate.applicability``); run tests
    that share a pipeline back to back (one load each), readers before the tests that change it
    (``quantgate.ordering``); harness tests first."""
    run = run_of(config)
    kept, dropped = [], []
    for item in items:
        case = case_of(item)
        reason = None if case is None else applicability.reason_not_applicable(item, case)
        name = getattr(item, "originalname", item.name)
        if case is None and run.plan is not None and run.plan.leaves_out_harness_test(name):
            reason = f"{name}: a harness test the {run.plan.name} plan leaves out (its harness_left_out)"
        if reason:
            run.left_out[reason] += 1
        if reason or _without_cases(item):
            dropped.append(item)
        else:
            kept.append(item)
    kept = _without_untimed_baselines(kept, run, dropped)
    if dropped:
        items[:] = kept
        config.hook.pytest_deselected(items=dropped)
    groups: dict[tuple[str, ...], int] = {}
    for item in items:
        case = case_of(item)
        if case is not None:
            groups.setdefault(case.pipeline_key, len(groups))
    order = {id(item): index for index, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[int, int, float, int]:
        case = case_of(item)
        if case is None:
            return (0, 0, 0, order[id(item)])
        if ordering.compares_cases(item):
            return (2, 0, 0, order[id(item)])
        return (1, groups[case.pipeline_key], ordering.role(item), order[id(item)])

    items.sort(key=key)
    for item in items:
        case = case_of(item)
        if case is not None:
            run.case_attrs[item.nodeid] = {"test": item.originalname, "case": case.id, "model": case.model,
                                           "source": case.source, "scheme": case.scheme, "variant": case.variant,
                                           "batch": case.batch, "device": case.device}


def pytest_collection_finish(session: pytest.Session) -> None:
    """After every deselection (-k, -m, plans): refuse a golden update that would write nothing."""
    run = session.config.pluginmanager.get_plugin("quantgate-run")
    if run is None or not run.update_golden or session.config.option.collectonly:
        return
    from quantgate.applicability import is_baseline

    writers = [item for item in session.items if "reference" in getattr(item, "fixturenames", ())
               and (case := case_of(item)) is not None and is_baseline(case)]
    if not writers:
        raise pytest.UsageError(
            "--quantgate-update-golden writes the golden images from the bf16 eager cases of the quality tests, and "
            "this selection has none: add bf16 to --quantgate-schemes and eager to --quantgate-variants, or drop the "
            "-k / -m filter that excludes tests/test_quality.py")


def _without_untimed_baselines(items: list[pytest.Item], run: QuantgateRun,
                               dropped: list[pytest.Item]) -> list[pytest.Item]:
    """``items`` less the comparisons (``compares_cases(timing=SCOPE)``, parametrized by ``baseline``)
    whose baseline case records no SCOPE timing in this session; each is counted in ``left_out``."""
    timed: set[tuple[Any, ...]] = set()
    for item in items:
        case, marker = case_of(item), item.get_closest_marker("times")
        if case is not None and marker is not None:
            timed.add((*case.pipeline_key, case.batch, marker.args[0]))
    kept = []
    for item in items:
        case, marker = case_of(item), item.get_closest_marker("compares_cases")
        scope = marker.kwargs.get("timing") if marker is not None else None
        baseline = dict(getattr(getattr(item, "callspec", None), "params", {}) or {}).get("baseline")
        if case is not None and scope and baseline and \
                (case.device, case.model, case.source, baseline, "eager", case.batch, scope) not in timed:
            run.left_out[f"{item.originalname}: {baseline} eager at batch {case.batch} has no {scope} timing "
                         f"in this selection"] += 1
            dropped.append(item)
        else:
            kept.append(item)
    return kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """Charge a test body's time to its kind (quality, LoRA, other tests) unless a phase inside claims it."""
    kind = "quality" if item.get_closest_marker("quality") else "lora" if item.get_closest_marker("lora") \
        else "other_tests"
    with run_of(item.config).phases.phase(kind):
        return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: after fixtures and every other plugin's teardown
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """After the test's teardown: check that the test left its pipeline as loaded, and release
    the pipeline when it changed, when the test may have altered it, or when no following test
    needs it.

    A changed pipeline or a release that leaves memory allocated fails this test (at teardown),
    saying what changed or how much stayed; the next test then gets a freshly loaded pipeline.
    Outermost, because pytest's log capture keeps the test's log records until its own teardown
    wrapper ends, and a record can hold an exception whose traceback holds the loading frames.
    """
    try:
        return (yield)
    finally:
        check_and_release(item, nextitem)


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(_RUN_KEY, None)
    if run is None:
        return
    if run.pipelines.current is not None:  # an interrupted run: no test is left to fail
        release(run, None, "session end")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(_RUN_KEY, None)
    if run is None:
        return
    phases = run.phases.totals()
    text = session_summary.lines(run, phases, run.phases.wall_seconds())
    if text:
        terminalreporter.section("quantgate")
        for line in text:
            terminalreporter.write_line(line)


class _BenchmarkHooks:
    """pytest-benchmark hooks, registered only when pytest-benchmark is active."""

    def pytest_benchmark_update_machine_info(self, config: pytest.Config, machine_info: dict) -> None:
        machine_info.update(machine_facts())

    def pytest_benchmark_update_commit_info(self, config: pytest.Config, commit_info: dict) -> None:
        # QUANTGATE_COMMIT names the code that runs and wins over git: a copied tree may carry
        # a stale .git (its HEAD then says another commit, "dirty"). GITHUB_SHA only fills in
        # where git knows nothing (an exported tree without .git).
        explicit = os.environ.get("QUANTGATE_COMMIT")
        if explicit:
            if commit_info.get("id") not in (None, "unknown", explicit):
                commit_info["git_head"] = commit_info.get("id")
            commit_info.update(id=explicit, commit_source="QUANTGATE_COMMIT")
        elif os.environ.get("GITHUB_SHA") and commit_info.get("id") in (None, "unknown"):
            commit_info.update(id=os.environ["GITHUB_SHA"], commit_source="GITHUB_SHA")

    def pytest_benchmark_update_json(self, config: pytest.Config, benchmarks: list, output_json: dict) -> None:
        # The one writer of the section; sub-plugins add their keys through the declared hook.
        section = run_of(config).summary()
        config.hook.pytest_quantgate_json_section(config=config, section=section, output_json=output_json)
        output_json["quantgate"] = section



__all__ = ["Bench", "CaseGates", "QuantgateError", "QuantgateLeakWarning", "QuantgateRun", "case_of", "default_cache_dir",
           "run_of"]
