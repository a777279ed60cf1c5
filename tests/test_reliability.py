"""A real CUDA out-of-memory, on purpose, through the plugin's pipeline cache (GPU tier).

A pytester session on the GPU runs the tiny FLUX.1-schnell pipeline under three schemes:
``fault-oom-load`` (bf16 + a 2 GiB ballast buffer on the transformer, then an allocation of
twice the card's memory while "quantizing"), ``fault-oom-call`` (the same allocation inside
the transformer's forward, from a test body that holds the model in a local) and ``bf16``.
The faulty cases fail with the OutOfMemoryError; every release (the failed load's included)
leaves allocated memory within the ``leaked_gpu_bytes`` gate of the load's baseline; the bf16
case then loads and runs. The control session without ``quantgate.plugin.isolation`` shows the
same check catching the 2 GiB a kept exception holds. The fault schemes are registered in
the inner session only (tests/fault_schemes.py). Seconds on an H100/H200, mostly imports:
``pytest -m gpu tests/test_reliability.py``.
"""

import json

import pytest
import torch

from quantgate.hardware import no_cuda_reason
from tests.conftest import REPO
from tests.fault_schemes import CASE_TESTS, FAULTS_CONFTEST, KEEPS_EXCEPTIONS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason=no_cuda_reason() if not
                                 torch.cuda.is_available() else "")]

BALLAST_MIB = 2048  # about the 2.5 GiB a failed quantization once left behind


def _id(test, scheme):
    return f"test_cases.py::{test}[flux-schnell-tiny-{scheme}-eager-b1-cuda]"


@pytest.fixture
def gpu_session(pytester, tiny_cache, monkeypatch):
    monkeypatch.setenv("QUANTGATE_BALLAST_MIB", str(BALLAST_MIB))
    monkeypatch.delenv("QUANTGATE_FAKE_ALLOCATOR", raising=False)  # the real allocator
    pytester.makeconftest(FAULTS_CONFTEST + KEEPS_EXCEPTIONS)
    pytester.makepyfile(test_cases=CASE_TESTS)

    def run(schemes, *extra):
        (pytester.path / "alive.jsonl").unlink(missing_ok=True)
        out = pytester.path / "out.json"
        result = pytester.runpytest_subprocess(
            "-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "-m", "gpu", "--quantgate-source=tiny",
            "--quantgate-models=flux-schnell", f"--quantgate-schemes={schemes}", "--quantgate-rounds=2",
            "--quantgate-warmup=1", f"--benchmark-json={out}", "-rA", *extra, timeout=300)
        alive = [json.loads(line) for line in (pytester.path / "alive.jsonl").read_text().splitlines()]
        return result, json.loads(out.read_text())["quantgate"], alive

    return run


def test_a_real_cuda_oom_fails_its_case_frees_its_memory_and_the_next_case_runs(gpu_session):
    result, quantgate, alive = gpu_session("fault-oom-load,fault-oom-call,bf16")

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = quantgate["outcomes"]
    # (a) the faulty cases fail with the real out-of-memory
    for test in ("test_forward", "test_footprint", "test_timed"):
        record = outcomes[_id(test, "fault-oom-load")]
        assert record["outcome"] == "failed" and record["when"] == "setup"
        assert "OutOfMemoryError: CUDA out of memory" in record["reason"]
    for test in ("test_forward", "test_timed"):
        record = outcomes[_id(test, "fault-oom-call")]
        assert record["outcome"] == "failed" and record["when"] == "call"
        assert record["reason"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert outcomes[_id("test_footprint", "fault-oom-call")]["outcome"] == "passed"
    # (b) each release returned to the load's baseline within the leaked_gpu_bytes gate
    releases = {r["pipeline"]: r for r in quantgate["releases"]}
    assert list(releases) == [f"cuda/flux-schnell/tiny/{scheme}/eager" for scheme in
                              ("fault-oom-load", "fault-oom-call", "bf16")]
    for record in releases.values():
        assert record["metric"] == "leaked_gpu_bytes" and record["passed"] is True, record
        assert record["leaked_bytes"] <= record["max"]
    assert releases["cuda/flux-schnell/tiny/fault-oom-load/eager"]["failed_load"] is True
    assert alive == [[], [], []]
    # (c) the next case loads and runs
    for test in ("test_forward", "test_footprint", "test_timed"):
        assert outcomes[_id(test, "bf16")]["outcome"] == "passed"


def test_the_leak_check_catches_what_a_kept_exception_holds_on_the_gpu(gpu_session):
    """The control: without quantgate.plugin.isolation, the exception a plugin keeps holds the
    failed case's transformer with its ballast, and the release reports it."""
    result, quantgate, alive = gpu_session("fault-oom-call,bf16", "-p", "no:quantgate.plugin.isolation")

    (oom_call, _) = quantgate["releases"]
    assert oom_call["pipeline"] == "cuda/flux-schnell/tiny/fault-oom-call/eager" and oom_call["passed"] is False
    assert oom_call["leaked_bytes"] >= BALLAST_MIB * 2**20
    assert alive[0] == ["fault-oom-call"]
    result.stdout.fnmatch_lines(["*LEAK cuda/flux-schnell/tiny/fault-oom-call/eager: *still allocated above the "
                                 "baseline after *test_timed*"])
