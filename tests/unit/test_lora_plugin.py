"""The LoRA side of the plugin: --quantgate-lora, its parametrization, and test ordering."""

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO

LORA_TESTS = """
import pytest

def test_plain(case):
    assert case.model

@pytest.mark.alters_pipeline
def test_altering(case):
    assert case.model

@pytest.mark.after_timings
def test_comparing(case):
    assert case.model

def test_with_a_lora(case, lora_source):
    assert lora_source
"""


@pytest.fixture
def args(tiny_cache):
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "--quantgate-models=flux-schnell",
            "--quantgate-schemes=bf16,int8-wo", "-m", "cpu"]


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "my_style.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, str(path))
    return path


def _ids(result):
    return [line.split("::", 1)[1] for line in result.outlines if "::" in line]


def test_without_a_user_lora_only_the_synthetic_one_runs_and_late_tests_come_last(pytester, args):
    pytester.makepyfile(LORA_TESTS)

    result = pytester.runpytest(*args, "--collect-only", "-q")

    assert _ids(result) == [
        "test_plain[flux-schnell-tiny-bf16-eager-b1-cpu]",
        "test_with_a_lora[synthetic-flux-schnell-tiny-bf16-eager-b1-cpu]",
        "test_comparing[flux-schnell-tiny-bf16-eager-b1-cpu]",
        "test_altering[flux-schnell-tiny-bf16-eager-b1-cpu]",
        "test_plain[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
        "test_with_a_lora[synthetic-flux-schnell-tiny-int8-wo-eager-b1-cpu]",
        "test_comparing[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
        "test_altering[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
    ]


def test_each_user_lora_adds_a_parametrization(pytester, args, lora_file):
    pytester.makepyfile(LORA_TESTS)

    result = pytester.runpytest(*args, "--collect-only", "-q", f"--quantgate-lora=flux-schnell={lora_file}",
                                "-k", "with_a_lora and bf16")

    assert _ids(result) == ["test_with_a_lora[synthetic-flux-schnell-tiny-bf16-eager-b1-cpu]",
                            "test_with_a_lora[user-my_style-flux-schnell-tiny-bf16-eager-b1-cpu]"]


@pytest.mark.parametrize(("value", "message"), [
    ("{tmp}/absent.safetensors", "*--quantgate-lora *absent.safetensors: no such file or directory*"),
    ("flux-pro={tmp}/x.safetensors", "*--quantgate-lora flux-pro=*unknown model 'flux-pro'*"),
])
def test_a_bad_lora_option_is_a_usage_error(pytester, args, tmp_path, value, message):
    pytester.makepyfile(LORA_TESTS)
    result = pytester.runpytest(*args, f"--quantgate-lora={value.format(tmp=tmp_path)}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message.format(tmp=tmp_path)])


COUNTING_CONFTEST = """
import quantgate.pipeline as pipeline_module

LOADS = []
_load = pipeline_module.load_pipeline

def counting(case, *args, **kwargs):
    LOADS.append(case.scheme)
    return _load(case, *args, **kwargs)

pipeline_module.load_pipeline = counting

def pytest_sessionfinish(session):
    (session.config.rootpath / "loads.txt").write_text(str(len(LOADS)))
"""

ORDER_LOG = """

@pytest.fixture(autouse=True)
def _log_order(request):
    with open(request.config.rootpath / "order.txt", "a") as f:
        f.write(request.node.originalname + "\\n")
"""

FUSING_TESTS = """
import pytest

def test_1_fuses_without_the_marker(case, lora_adapters, pipeline, lora):
    lora_adapters.load(lora)
    lora_adapters.fuse()

def test_2_needs_pristine_weights(case, pipeline):
    assert pipeline.pipe is not None

@pytest.mark.alters_pipeline
def test_3_fuses(case, lora_adapters, pipeline, lora):
    lora_adapters.load(lora)
    lora_adapters.fuse()

@pytest.mark.alters_pipeline
def test_4_fuses_again(case, lora_adapters, pipeline, lora):
    lora_adapters.load(lora)
    lora_adapters.fuse()
"""


def test_every_test_that_alters_the_pipeline_gets_one_no_other_test_changed(pytester, args):
    pytester.makeconftest(COUNTING_CONFTEST)
    pytester.makepyfile(FUSING_TESTS + ORDER_LOG)

    result = pytester.runpytest_subprocess(*args, "--quantgate-schemes=bf16")

    result.assert_outcomes(passed=4)
    # The reader runs first, then the test that fuses without the marker (a LoRA test: it mutates),
    # then the two marked ones; each fuse makes the next test load afresh.
    assert (pytester.path / "order.txt").read_text().split() == [
        "test_2_needs_pristine_weights", "test_1_fuses_without_the_marker", "test_3_fuses", "test_4_fuses_again"]
    assert (pytester.path / "loads.txt").read_text() == "3"
