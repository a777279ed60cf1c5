"""What a session measured, kept so later tests can compare cases (speedups, agreement)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantgate.cases import Case
from quantgate.measure.stats import ratio_ci95


@dataclass(frozen=True)
class Measurement:
    """One timed scope of one case."""

    case: Case
    scope: str  # "transformer" or "end_to_end"
    median_s: float
    stats: dict[str, float]
    peak_allocated_bytes: int | None
    # The same rounds on CUDA events, and the GPU's busy share (quantgate.plugin's Bench)
    clocks: dict[str, Any] = field(default_factory=dict)
    rounds: tuple[float, ...] = ()  # the timed rounds' seconds, for intervals on ratios


class Ratio(float):
    """A ratio of two medians (a speedup), a float, with its 95% bootstrap interval in ``ci95``
    (None: too few rounds). A float, so a test may compare or format it as before."""

    ci95: tuple[float, float] | None

    def __new__(cls, value: float, ci95: tuple[float, float] | None = None) -> Ratio:
        ratio = super().__new__(cls, value)
        ratio.ci95 = ci95
        return ratio

    @property
    def value(self) -> float:
        return float(self)


def _key(case: Case, scope: str, scheme: str | None = None, variant: str | None = None) -> tuple:
    return (case.device, case.model, case.source, scope, case.batch, scheme or case.scheme, variant or case.variant)


@dataclass
class Records:
    """Measurements of this session, by case and scope; quality references and samples."""

    measurements: dict[tuple, Measurement] = field(default_factory=dict)
    # (device, model, source) -> {"bf16 eager": images, ...}: reference and samples for grids
    images: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    # (device, model, source, batch) -> bf16 eager transformer output on the fixed inputs
    outputs: dict[tuple[str, str, str, int], Any] = field(default_factory=dict)
    # (device, model, source, batch, scheme, variant) -> relative error of the transformer output
    # vs bf16, for tests that compare two schemes' errors (GPTQ vs its round-to-nearest baseline)
    output_errors: dict[tuple[str, str, str, int, str, str], float] = field(default_factory=dict)

    def add(self, measurement: Measurement) -> None:
        self.measurements[_key(measurement.case, measurement.scope)] = measurement

    def get(self, case: Case, scope: str, scheme: str | None = None, variant: str | None = None) -> Measurement | None:
        """The measurement of ``case`` (or of its ``scheme``/``variant`` sibling at the same batch)."""
        return self.measurements.get(_key(case, scope, scheme, variant))

    def speedup(self, case: Case, scope: str, baseline: str, baseline_variant: str = "eager") -> tuple[float | None, str]:
        """Baseline median / this case's median, or None and the reason there is none."""
        own = self.get(case, scope)
        if case.scheme == baseline and case.variant == baseline_variant:
            return None, f"{case.id} is the {baseline} {baseline_variant} baseline itself"
        if own is None:
            return None, (f"{case.id} has no {scope} timing in this session (its timing test was skipped, "
                          f"failed or deselected)")
        base = self.get(case, scope, baseline, baseline_variant)
        if base is None:
            return None, (f"no {baseline} {baseline_variant} {scope} timing for {case.model} at batch {case.batch} "
                          f"on {case.device} in this session: include {baseline} in --quantgate-schemes and "
                          f"{baseline_variant} in --quantgate-variants")
        return base.median_s / own.median_s, ""

    def speedup_ci95(self, case: Case, scope: str, baseline: str,
                     baseline_variant: str = "eager") -> tuple[float, float] | None:
        """The 95% bootstrap interval of ``speedup`` from both cases' rounds (None: too few rounds).

        The two cases ran in separate pipeline groups (both transformers rarely fit one GPU's
        memory side by side, and a group is loaded once), so their rounds are independent
        samples, resampled each on its own, not pairs.
        """
        own, base = self.get(case, scope), self.get(case, scope, baseline, baseline_variant)
        if own is None or base is None:
            return None
        return ratio_ci95(base.rounds, own.rounds)

    def as_list(self) -> list[dict[str, Any]]:
        return [{"case": m.case.id, "scope": m.scope, "median_s": m.median_s,
                 "peak_allocated_bytes": m.peak_allocated_bytes} for m in self.measurements.values()]
