"""The per-case time budget (quantgate.plugin.timeouts), in pytester subprocesses with a 1 s budget.

Soft limit: a test that overruns while running Python is failed where it stands and the
next test runs. Hard limit: a test that never returns to Python (SIGALRM blocked, as in a
hung kernel) is killed with the process at budget + grace, after the session's results so
far are written to the partial-results file, which ``quantgate report`` reads.
"""

import json

import pytest

from tests.conftest import REPO
from tests.fault_schemes import CASE_TESTS, FAULTS_CONFTEST

SOFT = """
import time

def test_slow(case):
    time.sleep(30)

def test_next(case, benchmark):
    benchmark.pedantic(sum, args=([1, 2],), rounds=1)
"""

HARD = """
import signal
import time

def test_before(case, benchmark):
    benchmark.pedantic(sum, args=([1, 2],), rounds=1)

def test_hangs(case):
    # As a kernel that never returns to Python: the SIGALRM of the soft limit cannot land.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)

def test_after(case):
    assert case
"""

CASE = "flux-schnell-tiny-bf16-eager-b1-cpu"


@pytest.fixture
def args(pytester, tiny_cache, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "-m", "cpu", "-rA",
            "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16", "--quantgate-case-timeout=1",
            f"--benchmark-json={pytester.path / 'out.json'}"]


def _report(path):
    from quantgate.report.build import build_report
    from quantgate.report.claims import load_claims
    from quantgate.report.document import to_markdown
    from quantgate.results import load_runs

    return to_markdown(build_report(load_runs([path]), load_claims(REPO / "fixtures" / "claims.toml"), "timeouts"))


def test_a_test_over_its_budget_fails_and_the_next_one_runs(pytester, args):
    pytester.makepyfile(test_soft=SOFT)
    result = pytester.runpytest_subprocess(*args, "--quantgate-timeout-grace=60", timeout=120)

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1, passed=1)
    slow = f"test_soft.py::test_slow[{CASE}]"
    result.stdout.fnmatch_lines([f"FAILED test_soft.py::test_slow[[]{CASE}] - Failed: {slow.replace('[', '[[]')} "
                                 "exceeded its 1 s budget (--quantgate-case-timeout)*"])
    result.stdout.fnmatch_lines([f"*TIMEOUT {slow.replace('[', '[[]')}: over its 1 s budget*"])
    quantgate = json.loads((pytester.path / "out.json").read_text())["quantgate"]
    (timeout,) = quantgate["timeouts"]
    assert timeout == {**timeout, "nodeid": slow, "case": CASE, "kind": "soft", "budget_s": 1.0}
    assert "exceeded its 1 s budget" in quantgate["outcomes"][slow]["reason"]
    assert quantgate["outcomes"][f"test_soft.py::test_next[{CASE}]"]["outcome"] == "passed"
    assert f"| {slow} | {CASE} | failed (soft) | 1 s |" in _report(pytester.path / "out.json")


def test_a_test_that_never_returns_is_killed_at_budget_plus_grace_leaving_partial_results(pytester, args):
    pytester.makepyfile(test_hard=HARD)
    result = pytester.runpytest_subprocess(*args, "--quantgate-timeout-grace=1", timeout=120)

    hung = f"test_hard.py::test_hangs[{CASE}]"
    assert result.ret == 1
    result.stderr.fnmatch_lines([
        f"quantgate: {hung.replace('[', '[[]')} exceeded its 1 s budget + 1 s grace without returning to Python*"
        f"partial results in {pytester.path / 'out.json.partial.json'}; stacks follow, then exit 1",
    ])
    result.stderr.fnmatch_lines(["*in test_hangs*"])  # the main thread's stack, where it hung
    assert "test_after" not in result.stdout.str()  # the process ended there
    partial = pytester.path / "out.json.partial.json"
    data = json.loads(partial.read_text())
    quantgate = data["quantgate"]
    assert quantgate["partial"]["hung_test"] == hung
    (timeout,) = quantgate["timeouts"]
    assert timeout == {**timeout, "nodeid": hung, "case": CASE, "kind": "hard", "budget_s": 1.0, "grace_s": 1.0}
    assert timeout["elapsed_s"] >= 2.0  # killed at the hard limit, not before
    outcomes = quantgate["outcomes"]
    assert outcomes[f"test_hard.py::test_before[{CASE}]"]["outcome"] == "passed"
    assert outcomes[hung]["outcome"] == "failed" and outcomes[hung]["reason"].startswith(
        "hung: exceeded its 1 s budget + 1 s grace")
    assert [b["name"] for b in data["benchmarks"]] == [f"test_before[{CASE}]"]  # finished benchmarks are kept
    # The machine as quantgate describes it in every benchmark JSON: the partial file merges with
    # the session's other files (the merge compares exactly these keys).
    from quantgate.hardware import machine_facts
    from quantgate.results.merge import _SAME_MACHINE

    facts = machine_facts()
    assert {k: data["machine_info"].get(k) for k in _SAME_MACHINE} == {k: facts[k] for k in _SAME_MACHINE}

    text = _report(partial)
    assert f"| {hung} | {CASE} | killed (hard) | 1 s |" in text
    assert f"| {hung} | failed | hung: exceeded its 1 s budget + 1 s grace; the process was killed |" in text


def test_a_load_over_its_budget_fails_its_case_once_and_frees_its_memory(pytester, args, monkeypatch):
    monkeypatch.setenv("QUANTGATE_FAKE_ALLOCATOR", "1")  # allocator readings count the ballast
    pytester.makeconftest(FAULTS_CONFTEST)
    pytester.makepyfile(test_cases=CASE_TESTS)
    # 8 s: loading the tiny bf16 pipeline after it must fit with room on a busy CPU
    result = pytester.runpytest_subprocess(*[a for a in args if not a.startswith(("--quantgate-schemes",
                                                                                    "--quantgate-case-timeout"))],
                                           "--quantgate-schemes=fault-slow-load,bf16", "--quantgate-case-timeout=8",
                                           "--quantgate-rounds=1", "--quantgate-warmup=0",
                                           "--quantgate-timeout-grace=60", timeout=180)

    result.assert_outcomes(errors=3, passed=3)  # the slow load is not retried for each of its tests
    slow = "flux-schnell-tiny-fault-slow-load-eager-b1-cpu"
    result.stdout.fnmatch_lines([f"ERROR test_cases.py::test_forward[[]{slow}] - Failed: test_cases.py::test_forward"
                                 f"[[]{slow}] exceeded its 8 s budget*",
                                 f"ERROR test_cases.py::test_footprint[[]{slow}] - *already failed in this session: "
                                 "Failed: *exceeded its 8 s budget*"])
    quantgate = json.loads((pytester.path / "out.json").read_text())["quantgate"]
    failed_load = quantgate["releases"][0]
    assert failed_load["failed_load"] is True and failed_load["leaked_bytes"] == 0
    assert [t["kind"] for t in quantgate["timeouts"]] == ["soft"]


@pytest.mark.parametrize(("option", "message"), [
    ("--quantgate-case-timeout=soon", "*--quantgate-case-timeout must be a number of seconds, got 'soon'*"),
    ("--quantgate-timeout-grace=-1", "*--quantgate-timeout-grace must be >= 0, got -1*"),
])
def test_bad_budgets_are_usage_errors(pytester, args, option, message):
    pytester.makepyfile("def test_x(case):\n    assert case\n")
    result = pytester.runpytest(*args, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_under_xdist_the_killed_worker_is_reported_against_the_hung_test_and_the_run_goes_on(pytester, args):
    pytester.makepyfile(test_hard=HARD)
    result = pytester.runpytest_subprocess(*args, "--quantgate-timeout-grace=1", "-n", "2", timeout=180)

    hung = f"test_hard.py::test_hangs[{CASE}]"
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"*worker 'gw*' crashed while running '{hung.replace('[', '[[]')}'*"])
    result.assert_outcomes(passed=2, failed=1)  # test_after ran on the replacement worker
    (partial,) = pytester.path.glob("out.json.partial-gw*.json")  # one worker killed, once
    assert json.loads(partial.read_text())["quantgate"]["partial"]["hung_test"] == hung
    killed = partial.name.removeprefix("out.json.partial-").removesuffix(".json")
    result.stdout.fnmatch_lines([f"quantgate: xdist worker {killed} was killed (*); what it finished is merged from "
                                 f"its partial results {partial}"])
    # Nothing finished is lost: test_before's timing (on the killed worker) is in the run's JSON.
    merged = json.loads((pytester.path / "out.json").read_text())
    (before,) = [b for b in merged["benchmarks"] if b["name"].startswith("test_before")]
    assert before["extra_info"]["quantgate_worker"] == killed and before["stats"]["rounds"] == 1
    killed_in = {w["worker"]: w.get("killed_in") for w in merged["quantgate"]["xdist"]["workers"]}
    assert killed_in.pop(killed) == hung and set(killed_in.values()) == {None}  # the others: gw0/gw1, a replacement
    assert merged["quantgate"]["outcomes"][f"test_hard.py::test_after[{CASE}]"]["outcome"] == "passed"
