"""The fixtures tests take: ``quantgate_run``, ``prompts``, ``pipeline``, ``bench``, ``records``,
``runs_here``, ``speedup``, ``reference`` and ``gates``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from quantgate.applicability import is_baseline
from quantgate.cases import Case
from quantgate.errors import ConfigFileError, SourceInvalid, SourceUnavailable
from quantgate.gates import Verdict
from quantgate.hardware import machine_facts
from quantgate.pipeline import LoadedPipeline
from quantgate.plugin.bench import Bench
from quantgate.plugin.session import QuantgateRun, run_of
from quantgate.prompts import PromptSet
from quantgate.records import Ratio, Records
from quantgate.settings import golden_settings


@pytest.fixture(scope="session")
def quantgate_run(request: pytest.FixtureRequest) -> QuantgateRun:
    """The session's quantgate state (selection, gates, pipeline cache, records)."""
    return run_of(request.config)


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
        return is_baseline(self.case)

    def _settings(self) -> dict[str, Any]:
        return golden_settings(self.case, self.loaded.source.detail)  # shared with `quantgate golden`

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
