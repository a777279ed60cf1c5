"""Known failures: cases a device run showed fail on a given stack are skipped with the evidence,
only on that stack, and run anyway on request."""

import pytest

from quantgate.errors import ConfigFileError
from quantgate.known_failures import KnownFailures
from tests.conftest import REPO

H200_STACK = {"torch": "2.11.0", "torchao": "0.18.0"}


def _installed(versions):
    return lambda dist: versions.get(dist)


def test_the_committed_entries_match_only_the_stack_and_cases_they_were_seen_on():
    book = KnownFailures.load(REPO / "fixtures" / "known_failures.toml")
    flux = "flux-schnell"
    hit = book.find("int8-wo", "compile", "cuda", flux, _installed(H200_STACK))
    assert hit is not None and "61.6 s" in hit.reason and "reports/" in hit.evidence
    assert hit.where.endswith("known_failures.toml:6")
    assert book.find("int8-wo", "compile", "cuda:1", flux, _installed(H200_STACK)) is hit
    assert book.find("int8-wo", "compile", "cuda", "sd35-medium", _installed(H200_STACK)) is None  # not seen there
    assert book.find("int8-wo", "eager", "cuda", flux, _installed(H200_STACK)) is None
    assert book.find("int8-wo", "compile", "cpu", flux, _installed(H200_STACK)) is None
    for newer in ({"torch": "2.12.0", "torchao": "0.18.0"}, {"torch": "2.11.0", "torchao": "0.19.0"},
                  {"torch": "2.11.0"}):  # a newer stack (or no torchao) runs the case again
        assert book.find("int8-wo", "compile", "cuda", flux, _installed(newer)) is None
    for scheme in ("fp8-row", "fp8-tensor"):
        assert book.find(scheme, "model-offload", "cuda", "sd35-medium", _installed(H200_STACK)) is not None
    assert book.find("fp8-row", "encoder-offload", "cuda", flux, _installed(H200_STACK)) is None


def test_a_missing_file_is_an_empty_list(tmp_path):
    assert KnownFailures.load(tmp_path / "none.toml").entries == []


ENTRY = '''[[known]]
scheme = "int8-wo"
variant = "compile"
device = "cuda"
versions = {{ torch = "==2.11.*" }}
reason = "r"
evidence = "e"
{extra}'''


@pytest.mark.parametrize(("text", "match"), [
    (ENTRY.format(extra='colour = "red"\n'), r":1 \[colour\]: unknown key"),
    (ENTRY.format(extra="").replace('versions = { torch = "==2.11.*" }\n', ""), r":1 \[versions\]: required"),
    (ENTRY.format(extra="").replace('{ torch = "==2.11.*" }', "{}"), r"\[versions\]: .*must name the stack"),
    (ENTRY.format(extra="").replace("==2.11.*", "two"), r"\[versions.torch\]: not a version specifier"),
    (ENTRY.format(extra="").replace('"int8-wo"', '"int9"'), r"\[scheme\]: unknown scheme 'int9'"),
    (ENTRY.format(extra="").replace('"compile"', '"jit"'), r"\[variant\]: unknown variant 'jit'"),
    (ENTRY.format(extra='model = "sdxl"\n'), r"\[model\]: unknown model 'sdxl'"),
    ("[[known]\n", "not valid TOML"),
])
def test_a_bad_entry_names_the_file_line_and_key(tmp_path, text, match):
    path = tmp_path / "known.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=match):
        KnownFailures.load(path)


def test_a_known_failure_skips_with_its_evidence_and_runs_on_request(pytester, tiny_cache):
    import torch

    pytester.makefile(".toml", known=ENTRY.format(extra="").replace('"int8-wo"', '"bf16"')
                      .replace('"compile"', '"eager"').replace('"cuda"', '"cpu"')
                      .replace("==2.11.*", f"=={torch.__version__.split('+')[0]}")
                      .replace('"r"', '"hangs here"').replace('"e"', '"reports/x"'))
    pytester.makepyfile("def test_e2e(case, pipeline):\n    assert pipeline\n")
    args = ("-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "-m", "cpu", "-rs",
            "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16",
            f"--quantgate-known-failures={pytester.path / 'known.toml'}")
    result = pytester.runpytest(*args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*bf16 + eager on cpu is known to fail with torch==*: hangs here "
                                 "[[]*known.toml:1; evidence: reports/x]; --quantgate-run-known-failures runs it anyway"])
    # A subprocess: loading a pipeline in-process would leave modules (torch's inductor test ops)
    # that pytester's sys.modules restore drops and a later import registers twice.
    pytester.runpytest_subprocess(*args, "--quantgate-run-known-failures").assert_outcomes(passed=1)
