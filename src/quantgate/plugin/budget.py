"""The pytest side of GPU memory budgets (loaded by ``quantgate.plugin``).

- ``--quantgate-gpu-budget SIZE`` (``16GiB``, ``24GB``, ``16000MiB``): at session start on
  CUDA, torch's allocator is capped to the budget (see ``quantgate.budget``); gates may select
  on ``budget = "16GiB"``; the budget and the cap are recorded in the benchmark JSON
  (``quantgate.gpu_budget``).
- ``gpu_budget`` fixture: the session's budget and each pipeline's peak reserved bytes,
  sampled after the setup and the call of every test that uses the pipeline (peaks are
  reset when a new pipeline starts, so its loading counts). A scheme whose quantization is an
  offline step (``Scheme.offline_quantization``: svdquant-ref calibrates and quantizes a bf16
  model, which a user does once on a bigger GPU and ships) loads uncapped; its peak is
  recorded apart (``offline_quantization_peak_reserved_bytes``) and the budget applies from
  the quantized pipeline on.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from quantgate import options
from quantgate.budget import (
    AllocatorCap,
    BudgetTooSmall,
    apply_cap,
    budget_label,
    parse_budget,
    plan_cap,
    snapshot,
)
from quantgate.cases import Case
from quantgate.hardware import cuda_available, no_cuda_reason
from quantgate.records import Measurement, Records
from quantgate.schemes import BASELINE, Scheme, get_scheme
from quantgate.variants import VARIANTS


@dataclass
class GpuBudget:
    """The session's budget, its allocator cap and the peak reserved bytes per pipeline."""

    budget: int | None = None
    cap: AllocatorCap | None = None
    not_enforced: str | None = None  # why no cap was set (no CUDA device...)
    peaks: dict[tuple, int] = field(default_factory=dict)
    # (device, model, source, scheme, variant, batch) -> gpu_budget_fraction_used measured
    fractions: dict[tuple, float] = field(default_factory=dict)
    baselines: dict[str, str] = field(default_factory=dict)  # case id -> the offload variant it was compared with
    # pipeline key -> peak reserved bytes of its offline quantization (uncapped; see Scheme.offline_quantization)
    offline_peaks: dict[tuple, int] = field(default_factory=dict)
    _current: tuple | None = None

    @property
    def label(self) -> str | None:
        return budget_label(self.budget) if self.budget is not None else None

    def sample(self, case: Case) -> int | None:
        """Fold torch's peak reserved bytes so far into ``case``'s pipeline peak; return it."""
        if self.cap is None:
            return None
        import torch

        key = case.pipeline_key
        self.peaks[key] = max(self.peaks.get(key, 0), int(torch.cuda.max_memory_reserved()))
        return self.peaks[key]

    def start(self, case: Case) -> None:
        """Reset the peak when a new pipeline begins, so its loading is part of its peak."""
        if self.cap is None or case.pipeline_key == self._current:
            return
        import torch

        torch.cuda.reset_peak_memory_stats()
        self._current = case.pipeline_key

    def lift(self) -> None:
        """Let an offline quantization step use the whole device (it is not what the small card runs)."""
        import torch

        torch.cuda.set_per_process_memory_fraction(1.0)

    def restore(self, case: Case, pipe: Any = None) -> None:
        """After the offline step: record its peak, re-place the quantized pipeline as a shipped
        checkpoint would load (``compact``), free cached blocks, measure from here, cap again."""
        import torch

        from quantgate.measure.memory import release_memory

        self.offline_peaks[case.pipeline_key] = int(torch.cuda.max_memory_reserved())
        if pipe is not None:
            compact(pipe, case.device)
        release_memory("cuda")
        torch.cuda.reset_peak_memory_stats()
        self._current = case.pipeline_key
        self.peaks[case.pipeline_key] = int(torch.cuda.memory_reserved())
        apply_cap(self.cap)

    def record_fraction(self, case: Case, fraction: float) -> None:
        """Keep the measured fraction of the budget ``case`` used (what fits is reported per scheme)."""
        self.fractions[_fit_key(case)] = fraction

    def fits(self) -> dict[str, dict[str, float]]:
        """Per model/source/scheme/batch: each variant measured and the fraction of the budget it used."""
        out: dict[str, dict[str, float]] = {}
        for (_, model, source, scheme, variant, batch), fraction in sorted(self.fractions.items()):
            out.setdefault(f"{model}/{source}/{scheme}/b{batch}", {})[variant] = round(fraction, 4)
        return out

    def offload_baseline(self, case: Case, records: Records) -> tuple[str | None, Measurement | None, str]:
        """The fastest bf16 offload variant that fit the budget, its end-to-end timing, or why none."""
        fitting = []
        for variant in OFFLOAD_VARIANTS:
            fraction = self.fractions.get(_fit_key(case, BASELINE, variant))
            timing = records.get(case, "end_to_end", BASELINE, variant)
            if fraction is not None and fraction <= 1.0 and timing is not None:
                fitting.append((timing.median_s, variant, timing))
        if not fitting:
            return None, None, (f"no bf16 offload variant ({', '.join(OFFLOAD_VARIANTS)}) of {case.model} at batch "
                                f"{case.batch} both fit {self.label} and was timed end to end in this session: "
                                f"include bf16 in --quantgate-schemes and the offload variants in "
                                f"--quantgate-variants")
        _, variant, timing = min(fitting, key=lambda t: t[0])
        return variant, timing, ""

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.label, "budget_bytes": self.budget, "not_enforced": self.not_enforced,
                "cap": self.cap.as_dict() if self.cap is not None else None,
                "peak_reserved_bytes": {"/".join(k): v for k, v in self.peaks.items()},
                "fits": self.fits(), "offload_baseline_of": dict(self.baselines),
                "offline_quantization_peak_reserved_bytes": {"/".join(k): v for k, v in self.offline_peaks.items()}}


OFFLOAD_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.loads_on_cpu)


def compact(pipe: Any, device: str) -> list[str]:
    """Move the pipeline's modules held on the GPU to the CPU and back; return their names.

    The offline step (calibration, then quantized weights allocated between its temporaries)
    leaves the allocator's segments fragmented: on the H200, 19.5 GiB stayed reserved around
    6.4 GiB of live svdquant-ref weights, which ``empty_cache`` cannot return, and the capped
    pipeline ran out of memory with a third of the budget in use. A user loads the saved
    checkpoint into a fresh process instead; a round trip through the CPU gives the budget that
    packing. Modules whose weights are already off the GPU (offloaded) are left alone.
    """
    import torch

    from quantgate.measure.memory import release_memory

    on_gpu = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)
              and any(p.device.type == "cuda" for p in m.parameters())}
    for module in on_gpu.values():
        module.to("cpu")
    release_memory(device)
    for module in on_gpu.values():
        module.to(device)
    return list(on_gpu)


def offline_window(cap: AllocatorCap | None, scheme: Scheme, loaded_key: tuple | None, case: Case) -> bool:
    """Whether setting up ``case`` loads a pipeline whose quantization is an offline step (run uncapped)."""
    return cap is not None and scheme.offline_quantization is not None and loaded_key != case.pipeline_key


def _fit_key(case: Case, scheme: str | None = None, variant: str | None = None) -> tuple:
    return (case.device, case.model, case.source, scheme or case.scheme, variant or case.variant, case.batch)


_BUDGET = pytest.StashKey[GpuBudget]()


def pytest_addoption(parser: pytest.Parser) -> None:
    help_text = ("check claims for a smaller card: cap torch's GPU allocator at SIZE (16GiB, 24GB, 16000MiB) "
                 "and gate each case's peak against it; gates may select on budget = \"16GiB\"")
    parser.getgroup("quantgate").addoption("--quantgate-gpu-budget", dest="quantgate_gpu_budget", default=None,
                                           metavar="SIZE", help=help_text)
    parser.addini("quantgate_gpu_budget", help_text, default=None)


def pytest_configure(config: pytest.Config) -> None:
    raw = options.value(config, "gpu-budget")
    state = GpuBudget()
    if raw:
        try:
            state.budget = parse_budget(raw)
        except ValueError as exc:
            raise pytest.UsageError(f"--quantgate-gpu-budget: {exc}") from None
    config.stash[_BUDGET] = state


def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash[_BUDGET]
    if state.budget is None:
        return
    run = session.config.pluginmanager.get_plugin("quantgate-run")
    if run is not None:  # gates may select on the budget
        run.session_attrs["budget"] = state.label
    if not cuda_available():
        state.not_enforced = f"no allocator cap: {no_cuda_reason()}"
        return
    try:
        state.cap = plan_cap(state.budget, snapshot())
    except BudgetTooSmall as exc:
        raise pytest.UsageError(f"--quantgate-gpu-budget: {exc}") from None
    apply_cap(state.cap)


def _case(item: pytest.Item) -> Case | None:
    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("case") if callspec is not None else None
    return value if isinstance(value, Case) and value.device == "cuda" else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    state, case = item.config.stash[_BUDGET], _case(item)
    offline = False
    if case is not None:
        state.start(case)
        run = item.config.pluginmanager.get_plugin("quantgate-run")
        current = run.pipelines.current if run is not None else None
        offline = offline_window(state.cap, get_scheme(case.scheme), current and current.case_key, case)
        if offline:
            state.lift()
    yield
    if offline:
        loaded = run.pipelines.current if run is not None else None
        state.restore(case, loaded.pipe if loaded is not None and loaded.case_key == case.pipeline_key else None)
    if case is not None:
        state.sample(case)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield
    case = _case(item)
    if case is not None:
        item.config.stash[_BUDGET].sample(case)


def session_budget(config: pytest.Config) -> int | None:
    """The session's GPU budget in bytes (``--quantgate-gpu-budget``), or None."""
    state = config.stash.get(_BUDGET, None)
    return state.budget if state is not None else None


@pytest.fixture(scope="session")
def gpu_budget(request: pytest.FixtureRequest) -> GpuBudget:
    """The session's GPU budget (``--quantgate-gpu-budget``) and the peaks measured under it."""
    return request.config.stash[_BUDGET]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_BUDGET, None)
    if state is None or not state.fractions:
        return
    terminalreporter.section(f"quantgate GPU budget {state.label}")
    for name, variants in state.fits().items():
        fit = [v for v, f in variants.items() if f <= 1.0]
        detail = ", ".join(f"{v} {f:.2f}" for v, f in variants.items())
        terminalreporter.write_line(f"{name}: {'fits with ' + ', '.join(fit) if fit else 'does not fit'} "
                                    f"(fraction of the budget used: {detail})")


def pytest_quantgate_json_section(config: pytest.Config, section: dict, output_json: dict) -> None:
    """The budget, what each pipeline used of it and what fits (``quantgate.plugin.hookspec``)."""
    state = config.stash.get(_BUDGET, None)
    if state is not None:
        section["gpu_budget"] = state.as_dict()
