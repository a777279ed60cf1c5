"""The quantgate pytest plugin: options, markers, case parametrization, fixtures, hooks.

Tests read as the claims they check; the machinery lives here:

- ``case``: parametrized from the model/scheme/source/variant/batch selection (ids such as
  ``flux-schnell-synthetic-bnb-nf4-eager-b1-cuda``), marked ``gpu`` or ``cpu`` and with the
  scheme's backend marker, so ``-m "gpu and torchao"`` selects without reading code.
- ``pipeline``: the loaded pipeline of a case; at most one is held, tests that share it run
  consecutively, and it is released (with a leak check) when the next test needs another.
- ``bench``: times a callable through pytest-benchmark (GPU synchronized, warm-up rounds)
  and records case, footprint and peak memory in ``extra_info``.
- ``gates``: checks a measured value against ``fixtures/gates.toml``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from quantgate import __version__, applicability, options, ordering, session_summary
from quantgate.cases import TIERS, Case, Selection, plan_cases, selector_vocabulary
from quantgate.errors import ConfigFileError, QuantgateError, SourceInvalid, SourceUnavailable, UnknownNameError
from quantgate.gates import GateBook, Verdict
from quantgate.hardware import DeviceInfo, cuda_available, device_info, machine_facts, no_cuda_reason
from quantgate.known_failures import KnownFailures
from quantgate.measure import gpu_state
from quantgate.measure.flops import bf16_matmul_peak_tflops
from quantgate.measure.memory import synchronize, track_peak
from quantgate.measure.stages import time_stages
from quantgate.measure.timing import (
    CompilesInTimedRounds,
    EventClock,
    RoundPolicy,
    extend_rounds,
    gpu_busy_seconds,
    pedantic,
)
from quantgate.models import ModelSpec, get_model, model_names
from quantgate.models.registry import load_models
from quantgate.models.sources import AUTO, SOURCES, SourceContext, choose_source, get_source
from quantgate.phases import Phases
from quantgate.pipeline import LoadedPipeline, PipelineCache, Release
from quantgate.plans import Plan, matrix
from quantgate.prompts import PromptSet
from quantgate.quant.calibration import CalibrationSettings
from quantgate.records import Measurement, Ratio, Records
from quantgate.report.runs import SCHEMA_VERSION
from quantgate.schemes import get_scheme, scheme_markers, scheme_names
from quantgate.sharding import pipeline_group
from quantgate.variants import VARIANTS, get_variant

T = TypeVar("T")

# LoRA gates: the --quantgate-lora option and the lora fixtures live in their own plugin module.
# Several GPUs and runners (xdist workers, shards): quantgate.distribute.
pytest_plugins = ["quantgate.lora_plugin", "quantgate.distribute", "quantgate.budget_plugin",
                  "quantgate.cache_plugin",
                  # Faults: failed tests drop their frames; the per-case time budget.
                  "quantgate.isolation", "quantgate.timeouts",
                  # pytest-benchmark's JSON and saved runs written atomically; offline, weights-only loading.
                  "quantgate.benchmark_files", "quantgate.safe_loading"]

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


_RUN_KEY = pytest.StashKey["QuantgateRun"]()


def default_cache_dir() -> Path:
    """``$QUANTGATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantgate``, else ``~/.cache/quantgate``."""
    if os.environ.get("QUANTGATE_CACHE_DIR"):
        return Path(os.environ["QUANTGATE_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quantgate"


# -- options --------------------------------------------------------------------------------

_OPTIONS: dict[str, tuple[str, str | None]] = {
    # name: (help, default); each is also an ini key quantgate_<name>, and a plan may set it.
    "plan": ("a named selection of tests and cases from <rootdir>/fixtures/plans/ (or a .toml path); default: "
             "merge, unless --quantgate-models/-schemes/-variants/-batch select on their own", None),
    "models": ("comma-separated models (default: all registered)", None),
    "schemes": ("comma-separated schemes (default: all registered)", None),
    "variants": ("comma-separated variants (default: eager)", "eager"),
    "batch": ("comma-separated batch sizes (default: 1)", "1"),
    "source": ("weights source for the GPU tier: auto, hub, path, synthetic, tiny (default: auto)", AUTO),
    "cache-dir": ("quantgate's cache (synthetic weights...); default $QUANTGATE_CACHE_DIR or ~/.cache/quantgate", None),
    "gates": ("gates file (default: <rootdir>/fixtures/gates.toml)", None),
    "known-failures": ("cases known to fail on a given stack, skipped with their evidence "
                       "(default: <rootdir>/fixtures/known_failures.toml)", None),
    "prompts": ("prompt file (default: <rootdir>/fixtures/prompts/gate.txt)", None),
    "rounds": ("timed rounds per benchmark (default: 3)", "3"),
    "warmup": ("untimed warm-up rounds before them (default: 1)", "1"),
    "round-budget": ("seconds of timed rounds a GPU benchmark may take beyond --quantgate-rounds, to bring the "
                     "median's 95 percent confidence interval within --quantgate-ci-target (default: 3; 0: fixed rounds)",
                     "3"),
    "max-rounds": ("most timed rounds a GPU benchmark takes (default: 30)", "30"),
    "ci-target": ("relative half-width of the median's 95 percent confidence interval at which a GPU benchmark stops "
                  "(default: 0.01)", "0.01"),
    "cpu-rounds": ("timed rounds per benchmark on the CPU tier, where no timing is gated (default: --quantgate-rounds)",
                   None),
    "steps": ("override every model's number of inference steps", None),
    "resolution": ("override the resolution: N or HxW, multiples of 16", None),
    "seed": ("seed of synthetic weights and of generation (default: 0)", "0"),
    "golden-dir": ("golden image store (default: <rootdir>/golden_images)", None),
    "quality-prompts": ("how many gate prompts the quality tests generate, one image each (default: 4)", "4"),
    "artifacts": ("directory for side-by-side sample grids (default: none written)", None),
    "lpips-net": ("LPIPS backbone: alex, vgg or squeeze (default: alex); needs torchvision's pretrained "
                  "checkpoint in $TORCH_HOME/hub/checkpoints", "alex"),
    "clip-model": ("CLIP checkpoint for CLIP score: a directory or a hub repo id in the offline HF cache "
                   "(default: openai/clip-vit-large-patch14)", "openai/clip-vit-large-patch14"),
    "calibration-prompts": ("calibration prompt file for GPTQ/SVDQuant (default: "
                            "<rootdir>/fixtures/prompts/calibration.txt)", None),
    "calibration-samples": ("calibration samples (images generated) for GPTQ/SVDQuant "
                            "(default: 256 on a GPU, 16 on the CPU tier); sets both tiers", None),
    "gpu-calibration-samples": ("calibration samples on a GPU only (a plan's short calibration that leaves the "
                                "CPU tier's at 16); --quantgate-calibration-samples wins over it", None),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantgate", "quantgate: quantized diffusion pipeline gates")
    for name, (help_text, _) in _OPTIONS.items():
        group.addoption(f"--quantgate-{name}", dest=f"quantgate_{name.replace('-', '_')}", default=None,
                        help=help_text)
        parser.addini(f"quantgate_{name.replace('-', '_')}", help_text, default=None)
    group.addoption("--quantgate-path", dest="quantgate_path", action="append", default=[], metavar="MODEL=DIR",
                    help="a diffusers directory for MODEL, used by --quantgate-source path (repeatable)")
    group.addoption("--quantgate-run-known-failures", dest="quantgate_run_known_failures", action="store_true",
                    help="run the cases --quantgate-known-failures lists for this stack instead of skipping them")
    group.addoption("--quantgate-update-golden", dest="quantgate_update_golden", action="store_true",
                    help="write the bf16 eager images of this run as the golden set (atomically) before comparing")


def _option(config: pytest.Config, name: str) -> str | None:
    return options.value(config, name, _OPTIONS[name][1])


def _float(value: str | None, name: str, minimum: float) -> float:
    try:
        number = float(value or 0)
    except ValueError:
        raise pytest.UsageError(f"--quantgate-{name} must be a number, got {value!r}") from None
    if not number >= minimum:
        raise pytest.UsageError(f"--quantgate-{name} must be at least {minimum:g}, got {value!r}")
    return number


def _round_policy(config: pytest.Config) -> RoundPolicy:
    """How many rounds a GPU benchmark takes: --quantgate-rounds, then more within the budget."""
    rounds = _int(_option(config, "rounds"), "rounds", 1) or 1
    most = _int(_option(config, "max-rounds"), "max-rounds", 1) or rounds
    return RoundPolicy(min_rounds=rounds, max_rounds=max(rounds, most),
                       ci_target=_float(_option(config, "ci-target"), "ci-target", 0.0),
                       budget_s=_float(_option(config, "round-budget"), "round-budget", 0.0))


def _calibration(config: pytest.Config) -> CalibrationSettings:
    """Calibration settings from the options; the prompt file is read when a scheme needs it."""
    given = _option(config, "calibration-prompts")
    path = Path(given or config.rootpath / "fixtures" / "prompts" / "calibration.txt")
    prompts: tuple[str, ...] = ()
    if given or path.is_file():  # the default file may be absent where no scheme calibrates
        try:
            prompts = PromptSet.load(path).prompts
        except ConfigFileError as exc:
            raise pytest.UsageError(str(exc)) from None
    seed = _int(_option(config, "seed"), "seed", 0) or 0
    counts: dict[str, int] = {}
    gpu = _option(config, "gpu-calibration-samples")
    if gpu is not None:
        counts["samples"] = _int(gpu, "gpu-calibration-samples", 1) or 1
    samples = _option(config, "calibration-samples")
    # Given on the command line or in the ini file it sets both tiers, over a plan's GPU count.
    if samples is not None and (options.given(config, "calibration-samples") is not None or gpu is None):
        n = _int(samples, "calibration-samples", 1) or 1
        counts.update(samples=n, cpu_samples=n)
    elif samples is not None:
        counts["cpu_samples"] = _int(samples, "calibration-samples", 1) or 1
    return CalibrationSettings(prompts, seed=seed, prompts_file=str(path), **counts)


def _plan(config: pytest.Config) -> Plan:
    """The session's plan (``quantgate.plans``), narrowed or widened by the explicit selection options."""
    given = {name: options.given(config, name) for name in options.SELECTION_OPTIONS}
    models = _names(given["models"], model_names(), "model", get_model) if given["models"] is not None else None
    schemes = _names(given["schemes"], scheme_names(), "scheme", get_scheme) if given["schemes"] is not None else None
    variants = _names(given["variants"], list(VARIANTS), "variant", get_variant) \
        if given["variants"] is not None else None
    batches = None
    if given["batch"] is not None:
        batches = sorted({_int(b.strip(), "batch", 1) for b in given["batch"].split(",") if b.strip()})
        if not batches:
            raise pytest.UsageError("--quantgate-batch is empty")
    plan = options.session_plan(config)
    if plan is None:
        return matrix(models or model_names(), schemes or scheme_names(), variants or ["eager"], batches or [1])
    known = {name for name in vars(config.option) if name.startswith("quantgate_")}
    unknown = sorted(k for k in plan.options if options.dest(k) not in known)
    if unknown:
        raise pytest.UsageError(f"{plan.path}: [options] names {unknown[0]!r}, which is no --quantgate option")
    return plan.narrowed(models, schemes, variants, batches)


def _names(value: str | None, valid: Sequence[str], kind: str, lookup: Callable[[str], Any]) -> list[str]:
    if value is None:
        return list(valid)
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise pytest.UsageError(f"--quantgate-{kind}s is empty; valid {kind}s: {', '.join(valid)}")
    for name in names:
        try:
            lookup(name)
        except UnknownNameError as exc:
            raise pytest.UsageError(str(exc)) from None
    return names


def _int(value: str | None, flag: str, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise pytest.UsageError(f"--quantgate-{flag} must be an integer, got {value!r}") from None
    if number < minimum:
        raise pytest.UsageError(f"--quantgate-{flag} must be >= {minimum}, got {number}")
    return number


def _resolution(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims *= 2
    if len(dims) != 2 or any(d <= 0 or d % 16 for d in dims):
        raise pytest.UsageError(f"--quantgate-resolution must be N or HxW with multiples of 16, got {value!r}")
    return dims[0], dims[1]


def _paths(values: list[str]) -> dict[str, Path]:
    paths = {}
    for value in values:
        model, sep, directory = value.partition("=")
        if not sep or not directory:
            raise pytest.UsageError(f"--quantgate-path takes MODEL=DIR, got {value!r}")
        try:
            get_model(model)
        except UnknownNameError as exc:
            raise pytest.UsageError(f"--quantgate-path {value}: {exc}") from None
        paths[model] = Path(directory).expanduser()
    return paths


def _display_path(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (clickable in messages)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


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
    timeouts: list[dict[str, Any]] = field(default_factory=list)  # cases over their time budget (quantgate.timeouts)
    running: str | None = None  # the test in progress (for an interruption's record)
    interrupted: dict[str, Any] | None = None  # Ctrl-C: where the run stopped; the JSON says it is partial
    config: Any = None  # the pytest config, for the run's own hooks
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: Records = field(default_factory=Records)
    case_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)  # nodeid -> its case, for outcomes
    # Set by quantgate.distribute under -n / --quantgate-shard: why a comparison with another
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
        gates_path = _display_path(Path(_option(config, "gates") or config.rootpath / "fixtures" / "gates.toml"))
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
            record.update(outcome=report.outcome, when=report.when, reason=reason)

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
        gates_bytes = self.gates.path.read_bytes() if self.gates.path.is_file() else b""
        return {
            "version": __version__,
            "schema": SCHEMA_VERSION,  # bad-inputs: a reader refuses a newer layout by name
            "gates_file": str(self.gates.path),
            "gates_sha256": hashlib.sha256(gates_bytes).hexdigest(),
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


def _run(config: pytest.Config) -> QuantgateRun:
    return config.stash[_RUN_KEY]


def _case_of(item: pytest.Item | None) -> Case | None:
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("case") if callspec is not None else None
    return value if isinstance(value, Case) else None


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
    run = _run(metafunc.config)
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
    run = _run(config)
    kept, dropped = [], []
    for item in items:
        case = _case_of(item)
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
        case = _case_of(item)
        if case is not None:
            groups.setdefault(case.pipeline_key, len(groups))
    order = {id(item): index for index, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[int, int, float, int]:
        case = _case_of(item)
        if case is None:
            return (0, 0, 0, order[id(item)])
        if ordering.compares_cases(item):
            return (2, 0, 0, order[id(item)])
        return (1, groups[case.pipeline_key], ordering.role(item), order[id(item)])

    items.sort(key=key)
    for item in items:
        case = _case_of(item)
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
               and (case := _case_of(item)) is not None and is_baseline(case)]
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
        case, marker = _case_of(item), item.get_closest_marker("times")
        if case is not None and marker is not None:
            timed.add((*case.pipeline_key, case.batch, marker.args[0]))
    kept = []
    for item in items:
        case, marker = _case_of(item), item.get_closest_marker("compares_cases")
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
    with _run(item.config).phases.phase(kind):
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
        _check_and_release(item, nextitem)


def _check_and_release(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    run = _run(item.config)
    # Fixture values stay in item.funcargs until pytest drops them after this hook; whatever
    # they reference (a LoRA kit's pipeline) must not count as leaked by the release below.
    if isinstance(getattr(item, "funcargs", None), dict):
        item.funcargs.clear()
    case = _case_of(item)
    problems = []
    while run.pipelines.failed_releases:  # a load that raised in this test's setup: what did it leave?
        problems += _record_release(run, run.pipelines.failed_releases.pop(0), case, item.nodeid)
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
        following = _case_of(nextitem)
        if reload or following is None or following.pipeline_key != current.case_key:
            problems += _release(run, case, item.nodeid)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _release(run: QuantgateRun, case: Case | None, last_test: str | None = None) -> list[str]:
    return _record_release(run, run.pipelines.release(), case, last_test)


def _record_release(run: QuantgateRun, released: Release | None, case: Case | None,
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


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = session.config.stash.get(_RUN_KEY, None)
    if run is None:
        return
    if run.pipelines.current is not None:  # an interrupted run: no test is left to fail
        _release(run, None, "session end")


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
        output_json["quantgate"] = _run(config).summary()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def quantgate_run(request: pytest.FixtureRequest) -> QuantgateRun:
    """The session's quantgate state (selection, gates, pipeline cache, records)."""
    return _run(request.config)


@pytest.fixture(scope="session")
def prompts(quantgate_run: QuantgateRun) -> PromptSet:
    """The gate prompt set (``--quantgate-prompts``)."""
    try:
        return quantgate_run.prompts
    except ConfigFileError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture
def pipeline(runs_here: Case, quantgate_run: QuantgateRun) -> LoadedPipeline:
    """The loaded pipeline of the case; skips with the exact reason where it cannot run."""
    try:
        return quantgate_run.pipelines.get(runs_here)
    except SourceUnavailable as exc:
        pytest.skip(str(exc))
    except SourceInvalid as exc:
        pytest.fail(str(exc), pytrace=False)


class Bench:
    """Times a callable for one case and records what a reader of the JSON needs."""

    def __init__(self, benchmark: Any, case: Case, loaded: LoadedPipeline, run: QuantgateRun):
        self.compiles_in_timed_rounds = 0  # set by each call
        self.benchmark, self.case, self.loaded, self.run = benchmark, case, loaded, run
        self.rounds = run.cpu_rounds if case.device == "cpu" else run.rounds

    def __call__(self, scope: str, fn: Callable[[], T], flops_scope: str | None = None) -> T:
        """Time ``fn`` (``scope``: ``transformer`` or ``end_to_end``); return its last result.

        A first call runs outside the statistics and is reported on its own (for a compile
        variant it is the compilation); then warm-up rounds, then the timed rounds, each
        followed by a device synchronize. A scope of another name (``transformer_lora``)
        names which FLOPs it performs with ``flops_scope``.
        """
        case, run = self.case, self.run
        self.benchmark.group = f"{case.model}/{case.source}/{scope}/b{case.batch}/{case.device}"
        breaks_before = _graph_breaks()
        start = time.perf_counter()
        with run.phases.phase("compiling" if case.variant == "compile" else "timed_rounds"):
            fn()
            synchronize(case.device)
        first_call = time.perf_counter() - start
        events = EventClock(fn, case.device, skip=run.warmup_rounds)
        compiles = CompilesInTimedRounds(events, warmup_rounds=run.warmup_rounds)
        state_before = gpu_state.read(case.device)
        policy = run.round_policy if case.device != "cpu" else RoundPolicy(self.rounds, self.rounds)
        with track_peak(case.device) as peak, run.phases.phase("timed_rounds"):
            result = pedantic(self.benchmark, compiles, case.device, rounds=self.rounds,
                              warmup_rounds=run.warmup_rounds)
            # More rounds of the same wrapper: CUDA events and compile counts cover them too.
            spread = extend_rounds(self.benchmark, compiles, case.device, policy)
        state = gpu_state.around(state_before, gpu_state.read(case.device))
        busy = gpu_busy_seconds(fn, case.device) if scope.startswith("transformer") else None
        stages = None
        if scope == "end_to_end":  # one more call, untimed, with its stages bracketed
            with run.phases.phase("timed_rounds"):
                stages = time_stages(self.loaded.diffusers_pipeline, self.loaded.denoiser, case.device, fn)
        self.compiles_in_timed_rounds = compiles.count
        stats = self.benchmark.stats.stats if self.benchmark.stats is not None else None
        clocks = _clock_agreement(stats, events.seconds(), busy)
        flops = self.loaded.flops(case, flops_scope or scope)
        peak_tflops = run.bf16_peak_tflops(case.device)
        achieved = flops / stats.median / 1e12 if stats is not None and stats.median > 0 else None
        loaded = self.loaded.describe()
        self.benchmark.extra_info.update({
            "quantgate_version": __version__,
            "scope": scope,
            **case.as_dict(),
            "hardware": run.hardware(case),
            "device_name": run.device(case.device).name,
            "rounds": len(spread.get("round_seconds") or ()) or self.rounds,
            "min_rounds": self.rounds,
            "warmup_rounds": run.warmup_rounds,
            **spread,
            "first_call_seconds": round(first_call, 4),
            "dynamo_graph_breaks": _graph_breaks() - breaks_before,
            "dynamo_compiles_in_timed_rounds": compiles.count,
            "denoiser_flops_per_call": flops,
            "achieved_tflops": None if achieved is None else round(achieved, 2),
            "bf16_peak_tflops_measured": None if peak_tflops is None else round(peak_tflops, 1),
            "fraction_of_bf16_peak": None if achieved is None or not peak_tflops else round(achieved / peak_tflops, 4),
            "denoiser_footprint_bytes": self.loaded.denoiser_footprint.total_bytes,
            "pipeline_footprint_bytes": loaded["pipeline_footprint_bytes"],
            **{k: v for k, v in peak.as_dict().items() if k != "measured"},
            "peak_memory_measured": peak.peak_allocated is not None,
            **clocks,
            "gpu_state": state,
            "stages": stages,
            "pipeline": loaded,
        })
        if stats is not None:
            run.records.add(Measurement(case, scope, stats.median, {k: getattr(stats, k) for k in
                                        ("min", "max", "mean", "median", "iqr", "stddev")}, peak.peak_allocated,
                                        clocks, rounds=tuple(stats.data)))
        return result


# A path whose GPU runs kernels for less than this share of its wall time is bound by the host
# launching them (eager dynamic quantization: many small kernels), not by the GPU.
LAUNCH_BOUND_BELOW = 0.8


def _clock_agreement(stats: Any, event_seconds: list[float], busy: tuple[float, float] | None) -> dict[str, Any]:
    """The suite's clock against CUDA events over the same rounds, and how busy the GPU was."""
    import statistics

    out: dict[str, Any] = {"cuda_event_median_s": None, "timing_disagreement_vs_cuda_events": None,
                           "gpu_busy_fraction": None, "launch_bound": None}
    if stats is not None and event_seconds:
        events = statistics.median(event_seconds)
        out["cuda_event_median_s"] = events
        out["timing_disagreement_vs_cuda_events"] = abs(stats.median - events) / events if events > 0 else None
    # Busy time over the unprofiled median: the profiled call's own wall time carries the
    # profiler's per-launch overhead, which would make every path look launch bound.
    wall = stats.median if stats is not None and stats.median > 0 else (busy[1] if busy is not None else 0)
    if busy is not None and wall > 0:
        fraction = min(1.0, busy[0] / wall)
        out.update(gpu_busy_fraction=round(fraction, 4), launch_bound=fraction < LAUNCH_BOUND_BELOW,
                   gpu_busy_seconds=round(busy[0], 6), profiled_wall_seconds=round(busy[1], 6))
    return out


def _graph_breaks() -> int:
    import torch._dynamo.utils

    return sum(torch._dynamo.utils.counters["graph_break"].values())


@pytest.fixture
def bench(benchmark: Any, case: Case, pipeline: LoadedPipeline, quantgate_run: QuantgateRun) -> Bench:
    """``bench(scope, fn)``: time ``fn`` through pytest-benchmark for this case."""
    return Bench(benchmark, case, pipeline, quantgate_run)


@pytest.fixture
def records(quantgate_run: QuantgateRun) -> Records:
    """Everything this session has timed so far (for tests that compare cases)."""
    return quantgate_run.records


@pytest.fixture
def runs_here(case: Case, quantgate_run: QuantgateRun) -> Case:
    """The case, after skipping with the exact reason if it cannot run on this machine."""
    reason = quantgate_run.skip_reason(case)
    if reason:
        pytest.skip(reason)
    return case


@pytest.fixture
def speedup(runs_here: Case, records: Records, quantgate_run: QuantgateRun) -> Callable[[str, str], Ratio]:
    """``speedup(scope, baseline)``: the eager ``baseline``'s median over this case's, same batch,
    with the bootstrap interval of that ratio from both cases' rounds (gates pass on its bound).

    Skips, saying why, when the case cannot run here or either timing is missing from this session.
    """
    case = runs_here

    def compute(scope: str, baseline: str) -> float:
        value, reason = records.speedup(case, scope, baseline)
        if value is None:
            itself = case.scheme == baseline and case.variant == "eager"
            pytest.skip(reason + ("" if itself else quantgate_run.spread_note))
        return Ratio(value, records.speedup_ci95(case, scope, baseline))

    return compute


class CaseGates:
    """The gates of one case: ``require(metric, value)`` passes or fails the test.

    Every measured value is recorded in the JSON, also where no gate names it (``passed``
    is then null, and the summary lists it), so thresholds can be set from real data.
    """

    def __init__(self, run: QuantgateRun, case: Case, node: pytest.Item):
        self.run, self.case, self.node = run, case, node

    def _record(self, hardware: str, metric: str, value: float, verdict: Verdict | None,
                ci95: tuple[float, float] | None = None) -> None:
        outcome = verdict.as_dict() if verdict is not None else {
            "metric": metric, "value": value, "min": None, "max": None, "passed": None, "gate": None, "why": None}
        outcome["ci95"] = None if ci95 is None else [ci95[0], ci95[1]]
        record = {"nodeid": self.node.nodeid, "case": self.case.id, **self._attrs(hardware),
                  "device": self.case.device, **outcome,
                  "message": verdict.message if verdict is not None else f"{metric} = {value:.6g} (no gate)"}
        self.run.verdicts.append(record)
        self.node.user_properties.append(("quantgate_verdict", record))

    def _attrs(self, hardware: str) -> dict[str, Any]:
        return {**self.case.gate_attrs(hardware), **self.run.session_attrs}

    def require(self, metric: str, value: float | Ratio) -> Verdict | None:
        """Check one measured value against its gate (None: no gate names it; it is recorded).

        A ``Ratio`` with an interval passes on the interval's bound on the gate's side (a
        ``min`` on its lower end), so a speedup passes only when the rounds' noise cannot
        explain it."""
        return self.require_all({metric: value}).get(metric)

    def require_all(self, values: dict[str, float | Ratio]) -> dict[str, Verdict]:
        """Check several values; every one is recorded before any failure is raised."""
        hardware = self.run.hardware(self.case)
        verdicts, failures = {}, []
        for metric, value in values.items():
            gate = self.run.gates.lookup(metric, self._attrs(hardware))
            ci95 = value.ci95 if isinstance(value, Ratio) else None
            if gate is None:
                self._record(hardware, metric, float(value), None, ci95)
                continue
            verdict = gate.check(float(value), subject=self.case.id, ci95=ci95)
            self._record(hardware, metric, float(value), verdict, ci95)
            verdicts[metric] = verdict
            if not verdict.passed:
                failures.append(verdict.message)
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        # An ungated value is a measurement, not a skip: it is in the JSON and listed once in the
        # terminal summary (quantgate.session_summary), where a [[gate]] can be set from it.
        return verdicts


class QualityReference:
    """What a case's images and transformer output are compared with.

    Images: the golden set of the case's model and source when there is one, else the bf16
    eager images of this session (the bf16 case runs first, and is itself compared with a
    rerun of its own images). ``--quantgate-update-golden`` makes the bf16 eager case write
    its images as the golden set first. Every image set is also kept for the side-by-side grid
    (``--quantgate-artifacts``).
    """

    def __init__(self, run: QuantgateRun, case: Case, prompts: PromptSet, loaded: LoadedPipeline):
        self.run, self.case, self.loaded = run, case, loaded
        self.pairs = [(prompt, seed) for seed, prompt in enumerate(prompts.take(run.quality_prompts))]

    @property
    def is_baseline(self) -> bool:
        return self.case.scheme == "bf16" and self.case.variant == "eager"

    def _settings(self) -> dict[str, Any]:
        # The weights' identity too: a golden set made from other weights is stale, not a reference.
        return {"scheme": "bf16", **self.case.call_kwargs(), "weights": self.loaded.source.detail}

    def _golden(self) -> Any:
        from quantgate.quality.golden import GoldenInvalid, GoldenMissing, load_golden

        try:
            return load_golden(self.run.golden_dir, self.case.model, self.case.source, self._settings(), self.pairs)
        except GoldenMissing:
            return None
        except GoldenInvalid as exc:
            pytest.fail(str(exc), pytrace=False)

    def images(self, images: Any) -> tuple[Any, str]:
        """The reference for ``images`` (generated for ``self.pairs``) and what it is."""
        import numpy as np

        from quantgate.quality.golden import write_golden

        case, key = self.case, (self.case.device, self.case.model, self.case.source)
        label = f"{case.scheme} {case.variant}"
        samples = self.run.records.images.setdefault(key, {})
        if self.is_baseline and self.run.update_golden:
            write_golden(self.run.golden_dir, case.model, case.source, self._settings(),
                         [(p, s, img) for (p, s), img in zip(self.pairs, images, strict=False)],
                         {"device": self.run.device(case.device).name, "hardware": self.run.hardware(case),
                          "versions": machine_facts()["libraries"]})
        golden = self._golden()
        if golden is not None:
            samples.setdefault("golden", np.stack([golden.array(i) for i in range(len(self.pairs))]))
        samples[label] = images
        self._write_grid(key, samples)
        if golden is not None:
            return samples["golden"], f"golden set {golden.directory}"
        if self.is_baseline:
            # No golden set: bf16 eager is the session's reference, checked against a rerun of its first
            # image (one image: the reference must be reproducible, which one generation shows).
            samples.setdefault("reference", images)
            return self._generate(self.pairs[:1]), "a rerun of bf16 eager's first image in this session"
        if "reference" not in samples:
            pytest.skip(f"no reference images for {case.model}/{case.source}: no golden set in "
                        f"{self.run.golden_dir / case.model / case.source} and no bf16 eager run before this case "
                        "in this session (include bf16 in --quantgate-schemes)" + self.run.spread_note)
        return samples["reference"], "bf16 eager of this session"

    def case_images(self) -> Any:
        """This case's images for the gate prompts: the ones an earlier quality test of the same
        case generated, else generated now."""

        key = (self.case.device, self.case.model, self.case.source)
        label = f"{self.case.scheme} {self.case.variant}"
        cached = self.run.records.images.get(key, {}).get(label)
        if cached is not None and len(cached) == len(self.pairs):
            return cached
        return self._generate(self.pairs)

    def _generate(self, pairs: list[tuple[str, int]]) -> Any:
        import numpy as np

        return np.concatenate([self.loaded.generate(self.case, [prompt], seed=seed) for prompt, seed in pairs])

    def transformer_output(self, output: Any, rerun: Callable[[], Any]) -> Any:
        """The bf16 eager transformer output on the same inputs (recorded by the bf16 case, which
        gets a rerun of its own forward, ``rerun()``, to be compared with)."""
        key = (self.case.device, self.case.model, self.case.source, self.case.batch)
        if self.is_baseline:
            self.run.records.outputs[key] = output
            return rerun()
        if key not in self.run.records.outputs:
            pytest.skip(f"no bf16 eager transformer output for {self.case.model}/{self.case.source} at batch "
                        f"{self.case.batch} in this session (include bf16 in --quantgate-schemes)"
                        + self.run.spread_note)
        return self.run.records.outputs[key]

    def _write_grid(self, key: tuple[str, str, str], samples: dict[str, Any]) -> None:
        if self.run.artifacts_dir is None:
            return
        from quantgate.quality.grids import sample_grid

        path = self.run.artifacts_dir / f"grid-{key[1]}-{key[2]}-{key[0]}.png"
        order = sorted(samples, key=lambda name: (name not in ("golden", "reference"), name != "bf16 eager", name))
        sample_grid({name: samples[name] for name in order if name != "reference"},
                    [p for p, _ in self.pairs], path)
        record = {"kind": "sample_grid", "model": key[1], "source": key[2], "device": key[0],
                  "path": str(path.resolve()), "columns": [n for n in order if n != "reference"]}
        self.run.artifacts[:] = [a for a in self.run.artifacts if a["path"] != record["path"]] + [record]


@pytest.fixture
def reference(case: Case, pipeline: LoadedPipeline, quantgate_run: QuantgateRun, prompts: PromptSet) -> QualityReference:
    """The quality reference of this case (golden set, else this session's bf16 eager run)."""
    return QualityReference(quantgate_run, case, prompts, pipeline)


@pytest.fixture
def gates(case: Case, quantgate_run: QuantgateRun, request: pytest.FixtureRequest) -> CaseGates:
    """Gate checks bound to this case and this machine's hardware class."""
    return CaseGates(quantgate_run, case, request.node)


__all__ = ["Bench", "CaseGates", "QuantgateError", "QuantgateLeakWarning", "QuantgateRun", "default_cache_dir"]
