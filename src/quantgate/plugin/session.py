"""The run state of one pytest session (``QuantgateRun``), its accessors and the pipeline
releases between groups of tests."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quantgate import __version__, options, ordering
from quantgate.cases import Case, Selection, selector_vocabulary
from quantgate.errors import ConfigFileError, SourceInvalid, UnknownNameError
from quantgate.gates import GateBook, gates_digest
from quantgate.hardware import DeviceInfo, cuda_available, device_info, no_cuda_reason
from quantgate.known_failures import KnownFailures
from quantgate.measure.flops import bf16_matmul_peak_tflops
from quantgate.measure.timing import (
    RoundPolicy,
)
from quantgate.models import ModelSpec, get_model
from quantgate.models.registry import load_models
from quantgate.models.sources import AUTO, SOURCES, SourceContext, choose_source, get_source
from quantgate.phases import Phases
from quantgate.pipeline import PipelineCache, Release
from quantgate.plans import Plan
from quantgate.plugin.options import (
    _calibration,
    _display_path,
    _int,
    _option,
    _paths,
    _plan,
    _resolution,
    _round_policy,
)
from quantgate.prompts import PromptSet
from quantgate.records import Records
from quantgate.results import SCHEMA_VERSION
from quantgate.schemes import get_scheme
from quantgate.settings import default_cache_dir
from quantgate.variants import get_variant

_RUN_KEY = pytest.StashKey["QuantgateRun"]()


# -- session state --------------------------------------------------------------------------


@dataclass
class QuantgateRun:
    """Everything quantgate holds for one pytest session."""

    selection: Selection
    ctx: SourceContext
    gates: GateBook
    prompts_path: Path
    rounds: int
    warmup_rounds: int
    cpu_rounds: int
    round_policy: RoundPolicy  # GPU benchmarks; the CPU tier takes exactly cpu_rounds
    pipelines: PipelineCache
    golden_dir: Path = Path("golden_images")
    update_golden: bool = False
    quality_prompts: int = 4
    artifacts_dir: Path | None = None
    lpips_net: str = "alex"
    clip_model: str = "openai/clip-vit-large-patch14"
    known_failures: KnownFailures | None = None  # None: --quantgate-run-known-failures
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    timeouts: list[dict[str, Any]] = field(default_factory=list)  # cases over their time budget (quantgate.plugin.timeouts)
    running: str | None = None  # the test in progress (for an interruption's record)
    interrupted: dict[str, Any] | None = None  # Ctrl-C: where the run stopped; the JSON says it is partial
    config: Any = None  # the pytest config, for the run's own hooks
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: Records = field(default_factory=Records)
    case_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # nodeid -> its case, for outcomes
    # Set by quantgate.plugin.distribute under -n / --quantgate-shard: why a comparison with another
    # case (speedup, session reference) may find nothing here, appended to such skip reasons.
    spread_note: str = ""
    # Attributes of the whole session that gates select on besides the case's (budget: "16GiB").
    session_attrs: dict[str, Any] = field(default_factory=dict)
    # Pipelines a test may have changed for good (a LoRA fused, a failed LoRA load): released
    # after that test, so the next one loads afresh.
    altered: set[tuple[str, ...]] = field(default_factory=set)
    plan: Plan | None = None
    phases: Phases = field(default_factory=Phases)  # where the session's wall time went
    # (test, case) pairs not generated, by reason: GPU cases without a GPU, GPU-only schemes on
    # the CPU tier, tests that cannot apply to a scheme (quantgate.applicability)
    left_out: Counter[str] = field(default_factory=Counter)
    _devices: dict[str, DeviceInfo] = field(default_factory=dict)
    _peaks: dict[str, float | None] = field(default_factory=dict)
    _sources: dict[tuple[str, str], str] = field(default_factory=dict)
    _prompts: PromptSet | None = None
    _clip: Any = None

    @classmethod
    def from_config(cls, config: pytest.Config) -> QuantgateRun:
        """Read and validate every option; anything wrong is a UsageError saying what."""
        try:
            load_models()  # a broken model data file is reported before anything runs
        except ConfigFileError as exc:
            raise pytest.UsageError(str(exc)) from None
        source = _option(config, "source") or AUTO
        if source != AUTO and source not in SOURCES:
            raise pytest.UsageError(str(UnknownNameError("source", source, [*SOURCES, AUTO])))
        plan = _plan(config)
        selection = Selection(models=plan.models(), schemes=plan.schemes(), variants=plan.variants(),
                              batches=plan.batches(), source=source,
                              steps=_int(_option(config, "steps"), "steps", 1),
                              resolution=_resolution(_option(config, "resolution")))
        cache_dir = Path(_option(config, "cache-dir") or default_cache_dir()).expanduser()
        # Compiled kernels persist across runs next to the synthetic weights (unless the user
        # already chose a place): the second run of a compile variant is much cheaper.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
        ctx = SourceContext(cache_dir=cache_dir, paths=_paths(config.getoption("quantgate_path")),
                            seed=_int(_option(config, "seed"), "seed", 0) or 0)
        if source == "path":
            problems = []
            for model in selection.models:
                try:
                    get_source("path").resolve(get_model(model), ctx, "cpu")
                except SourceInvalid as exc:
                    problems.append(str(exc))
            if problems:
                raise pytest.UsageError("\n".join(problems))
        gates_path = _display_path(Path(_option(config, "gates") or config.rootpath / "fixtures" / "gates"))
        try:
            gates = GateBook.load(gates_path, selector_vocabulary())
            known = KnownFailures.load(_display_path(Path(_option(config, "known-failures")
                                                          or config.rootpath / "fixtures" / "known_failures.toml")))
        except ConfigFileError as exc:
            raise pytest.UsageError(str(exc)) from None
        prompts_path = Path(_option(config, "prompts") or config.rootpath / "fixtures" / "prompts" / "gate.txt")
        prompts = None
        if _option(config, "prompts") is not None:  # a file the user named is read now: a bad one stops the run
            try:
                prompts = PromptSet.load(prompts_path)
            except ConfigFileError as exc:
                raise pytest.UsageError(f"--quantgate-prompts: {exc}") from None
        phases = Phases()
        return cls(
            phases=phases,
            plan=plan,
            selection=selection,
            ctx=ctx,
            gates=gates,
            prompts_path=prompts_path,
            _prompts=prompts,
            rounds=_int(_option(config, "rounds"), "rounds", 1) or 1,
            warmup_rounds=_int(_option(config, "warmup"), "warmup", 0) or 0,
            cpu_rounds=_int(_option(config, "cpu-rounds") or _option(config, "rounds"), "cpu-rounds", 1) or 1,
            round_policy=_round_policy(config),
            pipelines=PipelineCache(ctx, _calibration(config), phases),
            golden_dir=_display_path(Path(_option(config, "golden-dir") or config.rootpath / "golden_images")),
            update_golden=bool(config.getoption("quantgate_update_golden")),
            known_failures=None if config.getoption("quantgate_run_known_failures") else known,
            quality_prompts=_int(_option(config, "quality-prompts"), "quality-prompts", 1) or 4,
            artifacts_dir=Path(_option(config, "artifacts")) if _option(config, "artifacts") else None,
            lpips_net=_option(config, "lpips-net") or "alex",
            clip_model=_option(config, "clip-model") or "openai/clip-vit-large-patch14",
        )

    def choose_source(self, spec: ModelSpec, device: str) -> str:
        key = (spec.name, device)
        if key not in self._sources:
            self._sources[key] = choose_source(self.selection.source, spec, device, self.ctx)
        return self._sources[key]

    def device(self, device: str) -> DeviceInfo:
        if device not in self._devices:
            self._devices[device] = device_info(device)
        return self._devices[device]

    def bf16_peak_tflops(self, device: str) -> float | None:
        """The device's measured dense bf16 matmul rate, measured once per session."""
        if device not in self._peaks:
            self._peaks[device] = bf16_matmul_peak_tflops(device)
        return self._peaks[device]

    def hardware(self, case: Case) -> str:
        return "cpu" if case.device == "cpu" else self.device(case.device).hardware_class

    @property
    def prompts(self) -> PromptSet:
        if self._prompts is None:
            self._prompts = PromptSet.load(self.prompts_path)
        return self._prompts

    def clip_scorer(self, device: str) -> Any:
        """The session's CLIP scorer on ``device`` (loaded once)."""
        from quantgate.quality.perceptual import ClipScorer

        if self._clip is None or self._clip.device != device:
            self._clip = ClipScorer(self.clip_model, device)
        return self._clip

    def cannot_exist(self, case: Case) -> str | None:
        """Why ``case`` is not generated on this machine at all, or None.

        GPU cases need a GPU; the CPU tier holds only schemes and variants that run on a CPU;
        a scheme made for some models only has no case of the others. What could run here
        with other packages or another GPU is generated and skips, saying why.
        """
        if case.device == "cuda" and not cuda_available() and not os.environ.get(options.PLAN_PREVIEW_ENV):
            return f"GPU cases: {no_cuda_reason()}"
        requires = get_scheme(case.scheme).requires
        if case.device not in requires.devices:
            return f"schemes that run only on {' or '.join(sorted(requires.devices))}: not on the {case.tier} tier"
        if requires.models is not None and case.model not in requires.models:
            return f"{case.scheme} supports only {', '.join(sorted(requires.models))}"
        variant = get_variant(case.variant)
        if case.device not in variant.devices:
            return f"variant {case.variant} runs only on {', '.join(sorted(variant.devices))}"
        return None

    def skip_reason(self, case: Case) -> str | None:
        """Why ``case`` cannot run on this machine, or None."""
        if case.device == "cuda" and not cuda_available():
            return no_cuda_reason()
        unmet = (get_variant(case.variant).unmet(case.device)
                 or get_scheme(case.scheme).requires.unmet(case.scheme, self.device(case.device), case.model))
        known = self.known_failures and self.known_failures.find(case.scheme, case.variant, case.device, case.model)
        if unmet or not known:
            return unmet
        return (f"{case.scheme} + {case.variant} on {case.device} is known to fail with {known.stack()}: "
                f"{known.reason} [{known.where}; evidence: {known.evidence}]; "
                f"--quantgate-run-known-failures runs it anyway")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep each test's outcome, skip reason and wall time (setup + call + teardown)."""
        attrs = self.case_attrs.get(report.nodeid, {})
        if attrs and "hardware" not in attrs:  # the report's criteria select by hardware class too
            try:
                attrs["hardware"] = "cpu" if attrs["device"] == "cpu" else self.device(attrs["device"]).hardware_class
            except Exception:  # noqa: BLE001 - a device that cannot be described leaves the field out
                attrs["hardware"] = None
        record = self.outcomes.setdefault(report.nodeid, {"outcome": None, "when": None, "reason": None,
                                                          "duration_s": 0.0, **attrs})
        record["duration_s"] = round(record["duration_s"] + report.duration, 4)
        if report.when == "call" or (report.when == "setup" and not report.passed) or (
                report.when == "teardown" and report.failed):
            reason = None
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = report.longrepr[2].removeprefix("Skipped: ")
            elif report.failed:
                reason = _failure_reason(report)
                self._say_failure(report.nodeid, report.when, reason)
            record.update(outcome=report.outcome, when=report.when, reason=reason)

    def _say_failure(self, nodeid: str, when: str, reason: str | None) -> None:
        """Print a failure's one-line reason as it happens: pytest prints reasons only at the end of
        the session, so a run cut short (a lease running out, a killed job) would lose them."""
        terminal = self.config.pluginmanager.get_plugin("terminalreporter") if self.config is not None else None
        if terminal is not None:
            terminal.ensure_newline()
            terminal.write_line(f"quantgate: FAILED {nodeid} ({when}): {reason}", red=True)

    # Hooks of the run itself (it is registered as the plugin "quantgate-run").
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        """Remember the test in progress, so an interruption can say where the run stopped."""
        self.running = nodeid

    def pytest_keyboard_interrupt(self) -> None:
        """Ctrl-C: mark the results as partial, naming the test it stopped in, and keep only the
        benchmarks that finished (pytest-benchmark cannot summarize one stopped inside its rounds)."""
        finished = [node for node in self.outcomes if node != self.running]
        self.interrupted = {"in_test": self.running, "finished_tests": len(finished),
                            "wall_seconds": round(self.phases.wall_seconds(), 1)}
        bs = getattr(self.config, "_benchmarksession", None) if self.config is not None else None
        if bs is not None:
            bs.benchmarks[:] = [bench for bench in bs.benchmarks if bench]

    def summary(self) -> dict[str, Any]:
        """What quantgate adds to the benchmark JSON."""
        return {
            "version": __version__,
            "schema": SCHEMA_VERSION,  # bad-inputs: a reader refuses a newer layout by name
            "gates_file": str(self.gates.path),
            "gates_sha256": gates_digest(self.gates.path),
            "selection": {"models": list(self.selection.models), "schemes": list(self.selection.schemes),
                          "variants": list(self.selection.variants), "batches": list(self.selection.batches),
                          "source": self.selection.source, "steps": self.selection.steps,
                          "resolution": self.selection.resolution, "rounds": self.rounds,
                          "warmup_rounds": self.warmup_rounds, "seed": self.ctx.seed},
            "plan": self.plan.as_dict() if self.plan is not None else None,
            "not_generated": dict(self.left_out),
            "wall_seconds": round(self.phases.wall_seconds(), 1),
            "phases": self.phases.totals(),
            "verdicts": self.verdicts,
            "artifacts": self.artifacts,
            "releases": self.releases,
            "timeouts": self.timeouts,
            "outcomes": self.outcomes,
            **({"interrupted": self.interrupted} if self.interrupted else {}),
        }


def _failure_reason(report: pytest.TestReport) -> str | None:
    """What a failure says in one line (the exception type and message), for the JSON and the report."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).split("\n")[0][:500]
    text = str(report.longrepr or "").strip().splitlines()
    return text[-1][:500] if text else None


def run_of(config: pytest.Config) -> QuantgateRun:
    """The session's ``QuantgateRun`` (for the sub-plugins and the CLI that collect with pytest)."""
    return config.stash[_RUN_KEY]


def case_of(item: pytest.Item | None) -> Case | None:
    """The ``case`` parameter of a collected test, or None for a harness test."""
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("case") if callspec is not None else None
    return value if isinstance(value, Case) else None




def check_and_release(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    run = run_of(item.config)
    # Fixture values stay in item.funcargs until pytest drops them after this hook; whatever
    # they reference (a LoRA kit's pipeline) must not count as leaked by the release below.
    if isinstance(getattr(item, "funcargs", None), dict):
        item.funcargs.clear()
    case = case_of(item)
    problems = []
    while run.pipelines.failed_releases:  # a load that raised in this test's setup: what did it leave?
        problems += record_release(run, run.pipelines.failed_releases.pop(0), case, item.nodeid)
    current = run.pipelines.current
    if current is not None:
        reload = None
        if case is not None and case.pipeline_key == current.case_key:
            if ordering.alters(item) or current.case_key in run.altered:
                reload = "altered"
            elif changes := current.changes():
                reload = "changed"
                problems.append(f"{item.nodeid} changed the pipeline it shares with the other tests of "
                                f"{'/'.join(current.case_key)}: " + "; ".join(changes)
                                + "; it is reloaded for the next test")
        run.altered.discard(current.case_key)
        following = case_of(nextitem)
        if reload or following is None or following.pipeline_key != current.case_key:
            problems += release(run, case, item.nodeid)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def release(run: QuantgateRun, case: Case | None, last_test: str | None = None) -> list[str]:
    return record_release(run, run.pipelines.release(), case, last_test)


def record_release(run: QuantgateRun, released: Release | None, case: Case | None,
                    last_test: str | None) -> list[str]:
    """Record what a release left allocated, naming the pipeline group and its last test; gate it.

    Returns the gate's failure message (a leak over ``leaked_gpu_bytes``), if any.
    """
    if released is None or released.leaked_bytes is None:
        return []
    record = {"pipeline": "/".join(released.case_key), "leaked_bytes": released.leaked_bytes,
              "above_session_baseline_bytes": released.above_session_baseline_bytes,
              "case": case.id if case is not None else None, "last_test": last_test,
              "failed_load": released.failed_load}
    problems = []
    if case is not None:
        gate = run.gates.lookup("leaked_gpu_bytes", case.gate_attrs(run.hardware(case)))
        if gate is not None:
            verdict = gate.check(float(released.leaked_bytes), subject="/".join(released.case_key))
            record.update(verdict.as_dict())
            if not verdict.passed:
                problems.append(f"{verdict.message}: releasing the pipeline after this test left that much "
                                "allocated (something still references it)")
    run.releases.append(record)
    return problems
