"""`quantgate regate`: a finished run's measured values against the gates as they are now, and
the committed GPU evidence under reports/ against fixtures/gates/."""

import json

import pytest

from quantgate.cases import case_attrs_from_id
from quantgate.cli import main
from quantgate.history.regate import exit_code, load_gates, recheck_run
from tests.conftest import REPO

GATES = """
[[gate]]
metric = "transformer_footprint_reduction"
scheme = "int8-wo"
min = {bound}
why = "test gate"
"""


def _run(records):
    return {"benchmarks": [], "machine_info": {}, "commit_info": {}, "datetime": "t", "version": "5.3.1",
            "quantgate": {"version": "0.1.0", "schema": 1, "verdicts": records}}


def _record(**extra):
    return {"nodeid": "tests/test_memory.py::test_transformer_footprint_reduction[x]",
            "case": "flux-schnell-synthetic-int8-wo-eager-b1-cuda", "hardware": "hopper",
            "metric": "transformer_footprint_reduction", "value": 1.997, "passed": True,
            "gate": "fixtures/gates.toml:50", **extra}


@pytest.mark.parametrize(("bound", "now"), [(1.9, True), (2.5, False)])
def test_a_recorded_value_is_judged_by_the_current_gate(tmp_path, bound, now):
    (tmp_path / "gates.toml").write_text(GATES.format(bound=bound))
    (row,) = recheck_run("run", _run([_record()]), load_gates(tmp_path / "gates.toml"))
    assert row.now_passed is now and row.then_passed is True
    assert row.changed is (not now)
    assert exit_code([row]) == int(not now)


def test_a_value_without_a_gate_stays_ungated_and_an_unknown_metric_is_left_out(tmp_path):
    (tmp_path / "gates.toml").write_text(GATES.format(bound=1.9))
    rows = recheck_run("run", _run([_record(case="sd35-medium-synthetic-bf16-eager-b1-cuda", passed=None),
                                    _record(metric="a_metric_from_another_version")]),
                       load_gates(tmp_path / "gates.toml"))
    assert [(r.now_passed, r.changed) for r in rows] == [(None, False)]


def test_a_value_measured_under_a_gpu_budget_is_judged_by_the_budget_gate_only(tmp_path):
    (tmp_path / "gates.toml").write_text('[[gate]]\nmetric = "gpu_budget_fraction_used"\nbudget = "16GiB"\n'
                                         'max = 1.0\nwhy = "fits"\n')
    record = _record(metric="gpu_budget_fraction_used", value=0.94)
    budgeted, unbudgeted = recheck_run("run", _run([{**record, "budget": "16GiB"}, record]),
                                       load_gates(tmp_path / "gates.toml"))
    assert budgeted.now_passed is True and "required <= 1" in budgeted.now.message
    assert unbudgeted.now is None  # a run without that budget is not held to it


def test_old_records_without_attributes_are_read_from_their_case_id():
    attrs = case_attrs_from_id("sd35-medium-synthetic-sparse24-int8-dq-group-offload-b16-cuda")
    assert attrs == {"model": "sd35-medium", "source": "synthetic", "scheme": "sparse24-int8-dq",
                     "variant": "group-offload", "batch": 16, "device": "cuda"}
    assert case_attrs_from_id("sdxl-synthetic-bf16-eager-b1-cuda") is None


def test_the_command_prints_measured_and_required_and_fails_on_a_failure(tmp_path, capsys):
    (tmp_path / "gates.toml").write_text(GATES.format(bound=2.5))
    run = tmp_path / "run.json"
    run.write_text(json.dumps(_run([_record()])))
    assert main(["regate", str(run), "--gates", str(tmp_path / "gates.toml")]) == 1
    out = capsys.readouterr().out
    assert "FAIL    flux-schnell-synthetic-int8-wo-eager-b1-cuda transformer_footprint_reduction: measured 1.997x, " \
           "required >= 2.500x" in out and "(recorded: pass)" in out
    assert "1 recorded value: 0 pass, 1 fail, 0 without a gate" in out


def _committed_runs():
    for path in sorted((REPO / "reports").rglob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "benchmarks" in data and "quantgate" in data:
            yield path, data


def test_no_value_the_committed_gpu_runs_passed_fails_the_current_gates():
    """A gate tightened past the evidence committed under reports/ must come with new evidence
    (a new run) rather than silently turn yesterday's passing GPU run into a failure."""
    book = load_gates(REPO / "fixtures" / "gates")
    runs = list(_committed_runs())
    assert runs, "no quantgate benchmark JSON under reports/"
    broken = [f"{path.relative_to(REPO)}: {row.now.message}" for path, data in runs
              for row in recheck_run(str(path), data, book) if row.then_passed is True and row.now_passed is False]
    assert not broken, "\n".join(broken)
