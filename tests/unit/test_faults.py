"""Isolation and leaks, in pytester sessions with fault-injection schemes (tests/fault_schemes.py).

A scheme that raises (out of memory while quantizing, or inside a forward in a test body)
fails its own tests with the exception and the session goes on; no failure keeps a pipeline
alive; a pipeline that does stay alive is reported with its bytes, its pipeline group and
the last test of the group. On the CPU the allocator readings count the fault schemes'
ballast tensors through weak references (QUANTGATE_FAKE_ALLOCATOR).
"""

import gc
import json
import weakref

import pytest
import torch

from tests.conftest import REPO
from tests.fault_schemes import CASE_TESTS, FAULTS_CONFTEST, KEEPS_EXCEPTIONS

MIB = 2**20


@pytest.fixture
def session(pytester, tiny_cache, monkeypatch):
    """A pytester session with the fault schemes and a simulated allocator; returns a runner."""
    monkeypatch.setenv("QUANTGATE_FAKE_ALLOCATOR", "1")
    monkeypatch.setenv("COLUMNS", "400")  # the short summary keeps each failure's message
    monkeypatch.setenv("QUANTGATE_BALLAST_MIB", "128")  # over the 64 MiB leaked_gpu_bytes gate
    pytester.makeconftest(FAULTS_CONFTEST + KEEPS_EXCEPTIONS)
    pytester.makepyfile(test_cases=CASE_TESTS)
    base = ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "-m", "cpu", "-rA",
            "--quantgate-models=flux-schnell", "--quantgate-rounds=1", "--quantgate-warmup=0",
            f"--benchmark-json={pytester.path / 'out.json'}"]

    def run(schemes, *extra):
        # A separate process: torchao/diffusers registrations cannot be imported twice into one.
        result = pytester.runpytest_subprocess(*base, f"--quantgate-schemes={schemes}", *extra, timeout=300)
        alive = [json.loads(line) for line in (pytester.path / "alive.jsonl").read_text().splitlines()]
        out = pytester.path / "out.json"
        return result, alive, json.loads(out.read_text())["quantgate"], out

    return run


def _id(test, scheme):
    return f"test_cases.py::{test}[flux-schnell-tiny-{scheme}-eager-b1-cpu]"


def _pattern(test, scheme):
    return _id(test, scheme).replace("[", "[[]")  # fnmatch: a literal bracket


def test_a_scheme_that_runs_out_of_memory_fails_its_own_tests_and_frees_its_pipeline(session):
    result, alive, quantgate, out = session("fault-oom-load,fault-oom-call,bf16")

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # out of memory while quantizing: every test of that case errors with the exception
    result.stdout.fnmatch_lines([
        f"ERROR {_id('test_forward', 'fault-oom-load')} - quantgate.errors.PipelineBuildError: "
        "flux-schnell-tiny-fault-oom-load-eager-b1-cpu: OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 160.00 GiB (while quantizing, simulated on the CPU)",
        f"ERROR {_pattern('test_footprint', 'fault-oom-load')} - *already failed in this session: OutOfMemoryError*",
    ])
    # out of memory in a forward: the tests that run one fail, the one that does not passes
    result.stdout.fnmatch_lines([f"FAILED {_pattern('test_forward', 'fault-oom-call')} - torch.OutOfMemoryError: "
                                 "CUDA out of memory. Tried to allocate 160.00 GiB (during inference*"])
    result.stdout.fnmatch_lines([f"FAILED {_pattern('test_timed', 'fault-oom-call')} - torch.OutOfMemoryError*"])
    result.stdout.fnmatch_lines([f"PASSED {_id('test_footprint', 'fault-oom-call')}"])
    # the next case loads and runs
    result.assert_outcomes(passed=4, failed=2, errors=3)
    for test in ("test_forward", "test_footprint", "test_timed"):
        result.stdout.fnmatch_lines([f"PASSED {_id(test, 'bf16')}"])

    # every release (the failed load's too) found the ballast gone and no fault pipeline alive
    releases = {r["pipeline"]: r for r in quantgate["releases"]}
    assert releases["cpu/flux-schnell/tiny/fault-oom-load/eager"]["failed_load"] is True
    assert [r["leaked_bytes"] for r in quantgate["releases"]] == [0, 0, 0]
    assert all(r["passed"] is True for r in quantgate["releases"])
    assert alive == [[], [], []]  # at the failed load's release, at fault-oom-call's, at bf16's
    assert "LEAK" not in result.stdout.str()
    # the JSON says why each failed
    reasons = {node: o["reason"] for node, o in quantgate["outcomes"].items() if o["outcome"] == "failed"}
    assert reasons[_id("test_forward", "fault-oom-call")].startswith(
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 160.00 GiB (during inference")
    assert "OutOfMemoryError" in reasons[_id("test_footprint", "fault-oom-load")]


def test_without_the_isolation_plugin_a_kept_exception_would_keep_the_pipeline(session):
    """The control: the same session, with quantgate.plugin.isolation blocked, leaks the failed test's
    pipeline through the kept exception (so the test above measures what isolation does)."""
    result, alive, quantgate, out = session("fault-oom-call,bf16", "-p", "no:quantgate.plugin.isolation")

    (oom_call, _) = quantgate["releases"]
    assert oom_call["pipeline"] == "cpu/flux-schnell/tiny/fault-oom-call/eager"
    assert oom_call["leaked_bytes"] == 128 * MIB and oom_call["passed"] is False
    assert alive[0] == ["fault-oom-call"]


def test_a_leak_fails_the_test_that_released_it_with_bytes_pipeline_group_and_last_test(session):
    result, alive, quantgate, out = session("fault-leak,bf16")

    result.assert_outcomes(passed=6, errors=1)  # the last test of fault-leak's group fails at teardown
    (leak, bf16) = quantgate["releases"]
    assert leak == {**leak, "pipeline": "cpu/flux-schnell/tiny/fault-leak/eager", "leaked_bytes": 128 * MIB,
                    "case": "flux-schnell-tiny-fault-leak-eager-b1-cpu", "last_test": _id("test_timed", "fault-leak"),
                    "failed_load": False, "passed": False, "metric": "leaked_gpu_bytes"}
    # bf16 loads with the leaked ballast still allocated: the leak is counted once, against fault-leak,
    # and the session's drift stays visible
    assert (bf16["leaked_bytes"], bf16["above_session_baseline_bytes"], bf16["passed"]) == (0, 128 * MIB, True)
    assert bf16["last_test"] == _id("test_timed", "bf16")
    result.stdout.fnmatch_lines([
        "*LEAK cpu/flux-schnell/tiny/fault-leak/eager: 0.125 GiB (134217728 bytes) still allocated above the "
        f"baseline after {_pattern('test_timed', 'fault-leak')}"])
    result.stdout.fnmatch_lines([
        f"ERROR {_pattern('test_timed', 'fault-leak')} - Failed: leaked_gpu_bytes of "
        "cpu/flux-schnell/tiny/fault-leak/eager: measured 0.125 GiB (134217728 bytes), required <= 0.062 GiB*"])
    released_after = _pattern("test_timed", "fault-leak")
    result.stdout.fnmatch_lines(["releases: 2, largest leak 0.125 GiB (134217728 bytes) in "
                                 f"cpu/flux-schnell/tiny/fault-leak/eager (released after {released_after})"])

    from quantgate.report.build import build_report
    from quantgate.report.claims import load_claims
    from quantgate.report.document import to_markdown
    from quantgate.results import load_runs

    text = to_markdown(build_report(load_runs([out]), load_claims(REPO / "fixtures" / "claims.toml"), "faults"))
    assert f"| cpu/flux-schnell/tiny/fault-leak/eager | {_id('test_timed', 'fault-leak')} | 128.0 MiB | FAIL |" in text




class Model:
    """Stands in for a pipeline's transformer; a weak reference tells whether anything holds it."""


def _fail_in_a_forward():
    model = Model()
    held = weakref.ref(model)

    def inner():  # a closure over the model, as torch's Module._call_impl runs one
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, in {type(model).__name__})")

    try:
        inner()
    except torch.OutOfMemoryError as exc:
        return exc, held


def test_a_cleared_exception_no_longer_holds_what_its_frames_held():
    from quantgate.frames import clear_exception_frames

    kept, held = _fail_in_a_forward()
    repr(kept.__traceback__.tb_next.tb_frame.f_locals)  # pytest reads locals when it renders a traceback
    gc.collect()
    assert held() is not None  # whoever keeps the exception keeps the model

    clear_exception_frames(kept)
    gc.collect()
    assert held() is None
    assert str(kept) == "CUDA out of memory (simulated, in Model)" and kept.__traceback__ is None


def test_a_failed_load_keeps_its_traceback_for_the_report_without_the_locals():
    from quantgate.frames import clear_exception_frames

    kept, held = _fail_in_a_forward()
    clear_exception_frames(kept, detach=False)
    assert kept.__traceback__ is not None and kept.__traceback__.tb_next.tb_frame.f_locals == {}


def test_a_test_that_changes_the_shared_pipeline_fails_and_the_next_test_gets_a_clean_one(session, pytester):
    """A test that leaves a hook on the transformer, and one that swaps a weight, each fail at
    teardown naming what changed; the tests after them see the pipeline as loaded."""
    pytester.makepyfile(test_cases=MUTATING_TESTS)

    result, alive, quantgate, out = session("fault-ballast")

    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines([
        f"ERROR {_pattern('test_1_leaves_a_hook', 'fault-ballast')} - Failed: *test_1_leaves_a_hook* changed the "
        "pipeline it shares with the other tests of cpu/flux-schnell/tiny/fault-ballast/eager: 1 modules' hooks "
        "changed (transformer: forward hooks 0 -> 1); it is reloaded for the next test"])
    result.stdout.fnmatch_lines([
        f"ERROR {_pattern('test_3_swaps_a_weight', 'fault-ballast')} - Failed: *1 tensors changed "
        "(transformer.proj_out.weight: storage (re-created or re-quantized))*"])
    # every release freed the ballast, the reloads included
    assert [r["leaked_bytes"] for r in quantgate["releases"]] == [0, 0, 0]


def test_a_test_that_keeps_a_reference_to_the_pipeline_fails_with_the_leak(session, pytester):
    pytester.makepyfile(test_cases=KEEPING_TESTS)

    result, alive, quantgate, out = session("fault-ballast,bf16")

    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines([f"ERROR {_pattern('test_2_keeps_the_transformer', 'fault-ballast')} - Failed: "
                                 "leaked_gpu_bytes of cpu/flux-schnell/tiny/fault-ballast/eager: measured 0.125 GiB*"])
    (kept, bf16) = quantgate["releases"]
    assert (kept["leaked_bytes"], kept["passed"]) == (128 * MIB, False)
    assert (bf16["leaked_bytes"], bf16["passed"]) == (0, True)  # the next case loaded and released cleanly


MUTATING_TESTS = """
import torch


def test_1_leaves_a_hook(case, pipeline):
    pipeline.denoiser.register_forward_hook(lambda module, args, out: out)


def test_2_sees_no_hook(case, pipeline):
    assert not pipeline.denoiser._forward_hooks


def test_3_swaps_a_weight(case, pipeline):
    layer = pipeline.denoiser.proj_out
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())


def test_4_sees_the_loaded_weight(case, pipeline):
    assert pipeline.changes() == []


def test_5_reads(case, pipeline):
    assert pipeline.denoiser_footprint.total_bytes > 0
"""

KEEPING_TESTS = """
KEPT = []


def test_1_reads(case, pipeline):
    assert pipeline.denoiser is not None


def test_2_keeps_the_transformer(case, pipeline):
    if case.scheme == "fault-ballast":
        KEPT.append(pipeline.denoiser)  # a module-level reference outlives the pipeline's release
"""
