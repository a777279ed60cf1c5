"""Session records: speedups against the eager baselines, with reasons when one is missing."""

from quantgate.cases import Selection, build_cases
from quantgate.records import Measurement, Records


def _cases():
    return build_cases(Selection(models=["flux-schnell"], schemes=["bf16", "bnb-nf4", "fp8-row"],
                                 variants=("eager", "compile")), lambda s, d: "synthetic", tiers=("gpu",))


def test_speedup_is_baseline_median_over_own_median():
    records = Records()
    by_id = {c.id: c for c in _cases()}
    bf16 = by_id["flux-schnell-synthetic-bf16-eager-b1-cuda"]
    fp8c = by_id["flux-schnell-synthetic-fp8-row-compile-b1-cuda"]
    records.add(Measurement(bf16, "transformer", 0.171, {}, None))
    records.add(Measurement(fp8c, "transformer", 0.098, {}, None))
    value, reason = records.speedup(fp8c, "transformer", "bf16")
    assert value == 0.171 / 0.098 and reason == ""


def test_missing_timings_and_the_baseline_itself_say_why():
    records = Records()
    by_id = {c.id: c for c in _cases()}
    bf16 = by_id["flux-schnell-synthetic-bf16-eager-b1-cuda"]
    fp8c = by_id["flux-schnell-synthetic-fp8-row-compile-b1-cuda"]
    assert "is the bf16 eager baseline itself" in records.speedup(bf16, "transformer", "bf16")[1]
    assert "has no transformer timing" in records.speedup(fp8c, "transformer", "bf16")[1]
    records.add(Measurement(fp8c, "transformer", 0.098, {}, None))
    value, reason = records.speedup(fp8c, "transformer", "bnb-nf4")
    assert value is None and "include bnb-nf4 in --quantgate-schemes" in reason


def test_a_speedup_interval_comes_from_both_cases_rounds():
    records = Records()
    by_id = {c.id: c for c in _cases()}
    bf16 = by_id["flux-schnell-synthetic-bf16-eager-b1-cuda"]
    fp8c = by_id["flux-schnell-synthetic-fp8-row-compile-b1-cuda"]
    base = (0.170, 0.171, 0.172, 0.171, 0.170, 0.173)
    own = (0.098, 0.099, 0.098, 0.100, 0.098, 0.099)
    records.add(Measurement(bf16, "transformer", 0.171, {}, None, rounds=base))
    records.add(Measurement(fp8c, "transformer", 0.0985, {}, None, rounds=own))
    low, high = records.speedup_ci95(fp8c, "transformer", "bf16")
    assert min(base) / max(own) <= low <= 0.171 / 0.0985 <= high <= max(base) / min(own)
    assert records.speedup_ci95(fp8c, "transformer", "bf16") == (low, high)  # seeded: reproducible
    records.add(Measurement(fp8c, "transformer", 0.098, {}, None, rounds=(0.098,)))
    assert records.speedup_ci95(fp8c, "transformer", "bf16") is None  # one round has no spread
