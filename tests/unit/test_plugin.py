"""The plugin end to end, in a pytester sandbox: options, ordering, markers, skips, JSON."""

import json

import pytest
import torch

from tests.conftest import REPO

CASE_TESTS = """
def test_first(case):
    assert case.device in ("cpu", "cuda")

def test_second(case):
    assert case.model
"""

E2E_TEST = """
import numpy as np

def test_e2e(case, pipeline, bench, prompts, gates):
    images = bench("end_to_end", lambda: pipeline.generate(case, prompts.take(case.batch)))
    assert np.isfinite(images).all()
    gates.require("transformer_footprint_reduction",
                  pipeline.denoiser_reference_bytes / pipeline.denoiser_footprint.total_bytes)
"""


@pytest.fixture
def args(tiny_cache):
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}",
            f"--quantgate-prompts={REPO / 'fixtures' / 'prompts' / 'gate.txt'}"]


def test_unknown_scheme_is_a_usage_error_listing_valid_names(pytester, args):
    pytester.makepyfile(CASE_TESTS)
    result = pytester.runpytest(*args, "--quantgate-schemes=bf16,nf5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown scheme 'nf5'; valid schemes: *bf16*bnb-nf4*"])


@pytest.mark.parametrize(("option", "message"), [
    ("--quantgate-models=flux-pro", "*unknown model 'flux-pro'; valid models: flux-dev, flux-schnell, sd35-medium*"),
    ("--quantgate-source=s3", "*unknown source 's3'; valid sources: auto, hub, path, synthetic, tiny*"),
    ("--quantgate-batch=0", "*--quantgate-batch must be >= 1, got 0*"),
    ("--quantgate-resolution=1000", "*--quantgate-resolution must be N or HxW with multiples of 16*"),
    ("--quantgate-path=flux-schnell", "*--quantgate-path takes MODEL=DIR*"),
    ("--quantgate-variants=eager,turbo", "*unknown variant 'turbo'; valid variants: *eager*"),
    ("--quantgate-schemes=bf16,int3", "*unknown scheme 'int3'; valid schemes: *bf16*"),
    ("--quantgate-schemes=", "*--quantgate-schemes is empty; valid schemes: *"),
])
def test_bad_options_are_usage_errors(pytester, args, option, message):
    pytester.makepyfile(CASE_TESTS)
    result = pytester.runpytest(*args, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_malformed_gates_file_stops_the_run_naming_file_and_key(pytester, args):
    pytester.makepyfile(CASE_TESTS)
    bad = pytester.path / "gates.toml"
    bad.write_text('[[gate]]\nmetric = "transformer_footprint_reduction"\nmin = 2\nwhy = "x"\nscheme = "nf5"\n')
    result = pytester.runpytest(*args, f"--quantgate-gates={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gates.toml:1 [[]scheme[]]: unknown scheme 'nf5'*"])


def test_an_incomplete_path_source_is_a_usage_error_naming_the_file(pytester, args, tmp_path):
    pytester.makepyfile(CASE_TESTS)
    (tmp_path / "flux").mkdir()
    result = pytester.runpytest(*args, "--quantgate-source=path", "--quantgate-models=flux-schnell",
                                f"--quantgate-path=flux-schnell={tmp_path / 'flux'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{tmp_path / 'flux' / 'model_index.json'} is missing*"])


def test_tests_sharing_a_pipeline_run_back_to_back_with_markers(pytester, args):
    pytester.makepyfile(CASE_TESTS)
    result = pytester.runpytest(*args, "--collect-only", "-q", "-m", "cpu and torchao",
                                "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16,int8-wo,int8-dq")
    ids = [line for line in result.outlines if "::" in line]
    assert ids == [
        "test_tests_sharing_a_pipeline_run_back_to_back_with_markers.py::test_first[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
        "test_tests_sharing_a_pipeline_run_back_to_back_with_markers.py::test_second[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
        "test_tests_sharing_a_pipeline_run_back_to_back_with_markers.py::test_first[flux-schnell-tiny-int8-dq-eager-b1-cpu]",
        "test_tests_sharing_a_pipeline_run_back_to_back_with_markers.py::test_second[flux-schnell-tiny-int8-dq-eager-b1-cpu]",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks how the GPU tier skips on a machine without a GPU")
def test_without_a_gpu_the_gpu_tier_is_not_generated_and_says_why(pytester, args):
    """No GPU cases exist on a machine without a GPU: the run selects nothing and exits 5 (a GPU
    runner that lost its GPU fails the job instead of passing it on skips), saying why."""
    pytester.makepyfile(E2E_TEST)
    result = pytester.runpytest(*args, "-m", "gpu", "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.assert_outcomes()
    result.stdout.fnmatch_lines(["not generated: 1 (test, case) pairs that cannot run here or cannot apply",
                                 "*1  GPU cases: no CUDA GPU visible to torch*run on a GPU runner, or select the "
                                 "CPU tier with -m cpu*"])


def test_the_cpu_tier_writes_a_benchmark_json_with_quantgate_records(pytester, args):
    pytester.makepyfile(E2E_TEST)
    out = pytester.path / "out.json"
    # A separate process: an in-process run would import torchao and diffusers' models inside
    # pytester's module snapshot, and their operator registrations cannot happen twice.
    result = pytester.runpytest_subprocess(*args, "-m", "cpu", "--quantgate-models=flux-schnell",
                                "--quantgate-schemes=bf16,bnb-nf4", "--quantgate-rounds=2", f"--benchmark-json={out}")
    result.assert_outcomes(passed=1)  # bnb-nf4 runs only on CUDA: no CPU case of it exists
    data = json.loads(out.read_text())

    (bench,) = data["benchmarks"]
    extra = bench["extra_info"]
    assert (extra["model"], extra["source"], extra["scheme"], extra["variant"], extra["batch"]) == (
        "flux-schnell", "tiny", "bf16", "eager", 1)
    assert extra["scope"] == "end_to_end" and extra["num_inference_steps"] == 4
    assert extra["denoiser_footprint_bytes"] == extra["pipeline"]["denoiser_bf16_reference_bytes"]
    assert extra["pipeline_footprint_bytes"] > extra["denoiser_footprint_bytes"]
    assert extra["peak_memory_measured"] is False and extra["peak_allocated_bytes"] is None  # CPU: not measured
    assert bench["stats"]["rounds"] == 2

    machine = data["machine_info"]
    assert machine["libraries"]["diffusers"] and machine["hardware_class"] in ("cpu", "hopper", "ada", "ampere")
    quantgate = data["quantgate"]
    (verdict,) = quantgate["verdicts"]
    assert verdict["passed"] and verdict["value"] == 1.0 and "/fixtures/gates/bf16.toml:" in verdict["gate"]
    assert not [o for o in quantgate["outcomes"].values() if o["outcome"] == "skipped"]
    assert quantgate["not_generated"]["schemes that run only on cuda: not on the cpu tier"] == 1  # bnb-nf4

    from quantgate.report.build import build_report
    from quantgate.report.claims import load_claims
    from quantgate.report.document import to_markdown
    from quantgate.results import load_runs

    summary = to_markdown(build_report(load_runs([out]), load_claims(REPO / "fixtures" / "claims.toml"), "cpu run"))
    assert "end to end: flux-schnell (tiny), batch 1, cpu" in summary and "| bf16 eager | " in summary
    assert ("| flux-schnell-tiny-bf16-eager-b1-cpu | transformer_footprint_reduction | 1.000x | >= 1.000x and "
            "<= 1.000x | pass |") in summary
    assert "| schemes that run only on cuda: not on the cpu tier | 1 |" in summary


def test_runs_split_over_commands_merge_into_one_json(pytester, args):
    from quantgate.results import load_benchmark_json, merge_benchmark_json

    pytester.makepyfile(E2E_TEST)
    outs = []
    for scheme in ("bf16", "int8-wo"):
        out = pytester.path / f"{scheme}.json"
        # Separate processes, as on separate runners (torchao's operator registrations cannot be
        # imported twice into one process, which in-process pytester runs would do).
        pytester.runpytest_subprocess(*args, "-m", "cpu", "--quantgate-models=flux-schnell", f"--quantgate-schemes={scheme}",
                           "--quantgate-rounds=1", "--quantgate-warmup=0", f"--benchmark-json={out}")
        outs.append(out)

    merged = merge_benchmark_json(outs)

    assert [b["extra_info"]["scheme"] for b in merged["benchmarks"]] == ["bf16", "int8-wo"]
    assert [b["extra_info"]["quantgate_part"] for b in merged["benchmarks"]] == [0, 1]
    assert len(merged["quantgate"]["verdicts"]) == 2 and len(merged["quantgate"]["parts"]) == 2
    other = load_benchmark_json(outs[1])
    other["machine_info"]["gpu"] = "NVIDIA H100 80GB HBM3"
    mixed = pytester.path / "mixed.json"
    mixed.write_text(json.dumps(other))
    with pytest.raises(Exception, match="machine_info\\['gpu'\\] differs"):
        merge_benchmark_json([outs[0], mixed])


QUALITY_TEST = """
import numpy as np
from quantgate.quality.metrics import psnr

def test_quality(case, pipeline, reference, gates):
    images = np.concatenate([pipeline.generate(case, [p], seed=s) for p, s in reference.pairs])
    expected, _ = reference.images(images)
    gates.require("image_psnr_db_vs_reference", psnr(images[:len(expected)], expected))
"""


def test_golden_sets_are_written_on_request_compared_and_guarded(pytester, args, tmp_path):
    pytester.makepyfile(QUALITY_TEST)
    golden = tmp_path / "golden"
    common = [*args, "-m", "cpu", "-rs", "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16,int8-wo",
              "--quantgate-quality-prompts=2", f"--quantgate-golden-dir={golden}"]

    missing = pytester.runpytest_subprocess(*common)
    missing.assert_outcomes(passed=2)  # int8-wo against this session's bf16, bf16 against a rerun of itself

    written = pytester.runpytest_subprocess(*common, "--quantgate-update-golden")
    written.assert_outcomes(passed=2)
    assert sorted(p.name for p in (golden / "flux-schnell" / "tiny").iterdir()) == [
        "00-seed0.png", "01-seed1.png", "manifest.json"]

    image = golden / "flux-schnell" / "tiny" / "01-seed1.png"
    image.write_bytes(image.read_bytes()[:-1])
    tampered = pytester.runpytest_subprocess(*common)
    tampered.assert_outcomes(failed=2)
    tampered.stdout.fnmatch_lines(["*01-seed1.png does not match the sha256 in manifest.json*"])


def test_quantgate_commit_names_the_code_even_over_a_stale_git_head(monkeypatch):
    from quantgate.plugin import _BenchmarkHooks

    monkeypatch.setenv("QUANTGATE_COMMIT", "abc123")
    info = {"id": "d0db638", "dirty": True}
    _BenchmarkHooks().pytest_benchmark_update_commit_info(None, info)
    assert info["id"] == "abc123" and info["git_head"] == "d0db638" and info["commit_source"] == "QUANTGATE_COMMIT"


def test_github_sha_only_fills_in_where_git_knows_nothing(monkeypatch):
    from quantgate.plugin import _BenchmarkHooks

    monkeypatch.delenv("QUANTGATE_COMMIT", raising=False)
    monkeypatch.setenv("GITHUB_SHA", "feed")
    known = {"id": "d0db638"}
    _BenchmarkHooks().pytest_benchmark_update_commit_info(None, known)
    assert known == {"id": "d0db638"}
    unknown = {"id": "unknown"}
    _BenchmarkHooks().pytest_benchmark_update_commit_info(None, unknown)
    assert unknown["id"] == "feed" and unknown["commit_source"] == "GITHUB_SHA"


INTERRUPTED_TESTS = E2E_TEST + """

def test_stopped_by_ctrl_c(case):
    raise KeyboardInterrupt
"""


def test_an_interrupted_run_writes_what_finished_marked_partial(pytester, args):
    pytester.makepyfile(INTERRUPTED_TESTS)
    out = pytester.path / "out.json"
    result = pytester.runpytest_subprocess(*args, "-m", "cpu", "--quantgate-models=flux-schnell",
                                           "--quantgate-schemes=bf16", "--quantgate-rounds=1", f"--benchmark-json={out}")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["INTERRUPTED in *test_stopped_by_ctrl_c* after 1 tests: the results are partial*"])
    data = json.loads(out.read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_e2e[flux-schnell-tiny-bf16-eager-b1-cpu]"]
    stop = data["quantgate"]["interrupted"]
    assert stop["in_test"].endswith("test_stopped_by_ctrl_c[flux-schnell-tiny-bf16-eager-b1-cpu]")
    assert stop["finished_tests"] == 1

    assert f"INTERRUPTED: {out} was stopped (Ctrl-C) in" in _summary_text(out)


def _summary_text(out):
    """The summary of ``out`` as Markdown (the report's text twin)."""
    from quantgate.report.build import build_report
    from quantgate.report.claims import load_claims
    from quantgate.report.document import to_markdown
    from quantgate.results import load_runs

    return to_markdown(build_report(load_runs([out]), load_claims(REPO / "fixtures" / "claims.toml"), "t"))


def test_a_sub_plugin_extends_the_json_section_through_the_declared_hook(pytester, args):
    """``pytest_quantgate_json_section`` (quantgate.plugin.hookspec): one writer of the section,
    every other plugin adding its keys there; the budget plugin's own key arrives the same way."""
    pytester.makeconftest("""
def pytest_quantgate_json_section(config, section, output_json):
    section["mine"] = {"keys": sorted(section)[:3], "benchmarks": len(output_json["benchmarks"])}
""")
    # a harness test (no case): the session only has to run for pytest-benchmark to write its JSON
    pytester.makepyfile("def test_the_hook_is_declared(pytestconfig):\n"
                        "    assert pytestconfig.pluginmanager.hook.pytest_quantgate_json_section.spec is not None\n")
    out = pytester.path / "out.json"
    result = pytester.runpytest(*args, "-m", "not gpu", f"--benchmark-json={out}")
    result.assert_outcomes(passed=1)
    section = json.loads(out.read_text())["quantgate"]
    # the hook saw the main plugin's keys already there, and the whole document
    assert section["mine"]["benchmarks"] == 0 and len(section["mine"]["keys"]) == 3
    assert set(section["mine"]["keys"]) <= set(section)
    assert "gpu_budget" in section and "wall_seconds" in section


KILLED_TESTS = """
import os

def test_gate_fails(case):
    assert 3 >= 5, "measured 3 vs required >= 5"

def test_killed(case):
    os._exit(3)  # the run dies here, as when a device lease runs out: no end-of-session summary
"""


def test_a_failure_reason_is_printed_when_it_happens_so_a_killed_run_keeps_it(pytester, args):
    pytester.makepyfile(KILLED_TESTS)
    result = pytester.runpytest_subprocess(*args, "-m", "cpu", "--quantgate-models=flux-schnell",
                                           "--quantgate-schemes=bf16")
    assert result.ret == 3
    result.stdout.fnmatch_lines(["quantgate: FAILED *test_gate_fails[[]flux-schnell-tiny-bf16-eager-b1-cpu[]] (call): "
                                 "AssertionError: measured 3 vs required >= 5"])
    assert "short test summary" not in result.stdout.str()
