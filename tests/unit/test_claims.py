"""The report's checklist: a claim passes only on measurements of what it names, against its own number."""

from __future__ import annotations

import pytest

from quantgate.errors import ConfigFileError
from quantgate.report.claims import evaluate, load_claims
from quantgate.results import load_runs
from tests.conftest import REPO

CLAIMS = load_claims(REPO / "fixtures" / "claims.toml")
CPU_RUN = REPO / "tests" / "fixtures" / "history" / "cpu-4-steps.json"


def _criterion(text: str):
    return next(c for g in CLAIMS.groups for c in g.criteria if c.claim.startswith(text))


@pytest.mark.parametrize("claim", ["3.5-3.6x less transformer memory", "Peak VRAM and latency",
                                   "FP8 (row-wise and tensor-wise) halves"])
def test_a_cpu_run_of_the_tiny_models_meets_no_claim_about_real_sizes_or_vram(claim):
    assert evaluate(_criterion(claim), load_runs([CPU_RUN])).status == "not measured"


def test_a_value_its_gate_passes_still_fails_the_claim_s_own_number(tmp_path):
    path = tmp_path / "claims.toml"
    path.write_text('[[claims]]\nname = "x"\n[[claims.criterion]]\nclaim = "4x smaller"\n'
                    'metric = "transformer_footprint_reduction"\nscheme = "int8-wo"\nmin = 4\n')
    (criterion,) = load_claims(path).groups[0].criteria
    runs = load_runs([REPO / "reports" / "merge-h200-2026-12-02" / "benchmark.json"])
    result = evaluate(criterion, runs)
    assert result.status == "fail"
    assert any("1.997 (FAIL" in line and "the claim: >= 4" in line for line in result.evidence), result.evidence


def test_bounds_without_a_metric_are_refused(tmp_path):
    path = tmp_path / "claims.toml"
    path.write_text('[[claims]]\nname = "x"\n[[claims.criterion]]\nclaim = "c"\ntest = "test_a"\nmin = 1\n')
    with pytest.raises(ConfigFileError, match="min/max bound a metric; it names none"):
        load_claims(path)


def test_an_sd35_case_does_not_meet_a_flux_claim():
    runs = load_runs([REPO / "reports" / "merge-h200-2026-12-02" / "benchmark.json"])
    result = evaluate(_criterion("FP8 (row-wise and tensor-wise) halves"), runs)
    assert result.status == "pass" and not any("sd35" in line for line in result.evidence)
