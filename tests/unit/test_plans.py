"""Plans (fixtures/plans/*.toml): loading, narrowing, their options, what they generate, and
`quantgate plan`."""

from pathlib import Path

import pytest

from quantgate.cases import selector_vocabulary
from quantgate.errors import ConfigFileError, UnknownNameError
from quantgate.plans import Entry, find_plan, load_plan, plan_dirs, plan_names
from tests.conftest import REPO

PLANS = REPO / "fixtures" / "plans"


@pytest.mark.parametrize("name", plan_names([PLANS]))
def test_every_shipped_plan_loads(name):
    plan = load_plan(find_plan(name, [PLANS]), selector_vocabulary())
    assert plan.name == name and plan.entries and plan.description


def test_merge_is_shipped_and_names_what_it_leaves_to_nightly():
    assert {"merge", "nightly", "budget-16g"} <= set(plan_names(plan_dirs(REPO)))
    merge = load_plan(PLANS / "merge.toml", selector_vocabulary())
    assert merge.options["gpu-calibration-samples"] == "4" and merge.leaves  # the CPU tier keeps its 16
    assert set(merge.models()) == {"flux-schnell", "sd35-medium", "flux-dev"}  # flux-dev: the CPU tier only
    gpu_models = {m for e in merge.entries if "gpu" in e.tiers for m in e.models}
    assert gpu_models == {"flux-schnell", "sd35-medium"}  # FLUX.1-dev's weights would not fit the runner's disk


def test_explicit_options_replace_a_dimension_in_every_entry():
    merge = load_plan(PLANS / "merge.toml", selector_vocabulary())
    narrowed = merge.narrowed(schemes=["bf16"], batches=[2])
    assert {e.schemes for e in narrowed.entries} == {("bf16",)} and {e.batches for e in narrowed.entries} == {(2,)}
    assert [e.tests for e in narrowed.entries] == [e.tests for e in merge.entries]  # tests stay the plan's


@pytest.mark.parametrize(("text", "message"), [
    ('[[select]]\nmodels = ["flux-schnell"]\n', "bad.toml:1: \\[\\[select\\]\\] needs schemes"),
    ('[[select]]\nmodels = ["sdxl"]\nschemes = "*"\n', "bad.toml:1: unknown model 'sdxl'"),
    ('[[select]]\nmodels = "*"\nschemes = "*"\nbatches = [0]\n', "batches must be a list of integers >= 1"),
    ('[[select]]\nmodels = "*"\nschemes = "*"\nmodle = 1\n', "unknown key 'modle'"),
    ('description = "x"\n', "at least one \\[\\[select\\]\\]"),
    ('[[select]]\nmodels = "*"\nschemes = "*"\ntiers = ["tpu"]\n', "unknown tier 'tpu'"),
])
def test_a_bad_plan_names_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=message):
        load_plan(path, selector_vocabulary())


def test_an_unknown_plan_lists_the_plans_there_are():
    with pytest.raises(UnknownNameError, match="unknown plan 'nightlyy'; valid plans: .*merge.*nightly"):
        find_plan("nightlyy", [PLANS])


def test_entries_select_tests_by_name_pattern():
    entry = Entry(models=("flux-schnell",), schemes=("bf16",), tests=("test_lora_*", "test_transformer_forward"))
    assert entry.selects_test("test_lora_load_time") and entry.selects_test("test_transformer_forward")
    assert not entry.selects_test("test_transformer_forward_with_a_lora")


PLAN = """
description = "a small plan"
[options]
rounds = 2
warmup = 0
gpu-calibration-samples = 4

[[select]]
models = ["flux-schnell"]
schemes = ["bf16", "int8-wo"]
tests = ["test_a"]

[[select]]
models = ["flux-schnell"]
schemes = ["bf16"]
tests = ["test_b"]
"""

TESTS = """
def test_a(case):
    assert case.scheme in ("bf16", "int8-wo")

def test_b(case):
    assert case.scheme == "bf16"

def test_rounds(quantgate_run):
    with open("rounds.txt", "w") as f:
        f.write(str(quantgate_run.rounds))

def test_calibration(quantgate_run):
    settings = quantgate_run.pipelines.calibration
    with open("calibration.txt", "w") as f:
        f.write(f"{settings.samples} {settings.cpu_samples}")
"""


def _args(tiny_cache):
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "-m", "cpu or not (cpu or gpu)"]


def test_a_plan_generates_exactly_its_pairs_and_its_options_are_defaults(pytester, tiny_cache):
    (pytester.path / "fixtures" / "plans").mkdir(parents=True)
    (pytester.path / "fixtures" / "plans" / "small.toml").write_text(PLAN)
    pytester.makepyfile(TESTS)

    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "--collect-only", "-q")
    ids = [line.split("::", 1)[1] for line in result.outlines if "::" in line]
    assert ids == ["test_rounds", "test_calibration", "test_a[flux-schnell-tiny-bf16-eager-b1-cpu]",
                   "test_b[flux-schnell-tiny-bf16-eager-b1-cpu]", "test_a[flux-schnell-tiny-int8-wo-eager-b1-cpu]"]

    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "-k", "rounds")
    assert result.ret == 0 and (pytester.path / "rounds.txt").read_text() == "2"  # the plan's option
    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "--quantgate-rounds=5", "-k", "rounds")
    assert (pytester.path / "rounds.txt").read_text() == "5"  # the command line wins

    # a plan's GPU calibration leaves the CPU tier's default; --quantgate-calibration-samples sets both
    pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "-k", "calibration")
    assert (pytester.path / "calibration.txt").read_text() == "4 16"
    pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "-k", "calibration",
                       "--quantgate-calibration-samples=8")
    assert (pytester.path / "calibration.txt").read_text() == "8 8"

    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "--quantgate-schemes=int8-wo",
                                "--collect-only", "-q")
    ids = [line.split("::", 1)[1] for line in result.outlines if "::" in line]
    assert ids == ["test_rounds", "test_calibration", "test_a[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
                   "test_b[flux-schnell-tiny-int8-wo-eager-b1-cpu]"]


def test_without_a_plan_the_selection_options_select_exactly_their_matrix(pytester, tiny_cache):
    pytester.makepyfile(TESTS)
    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-schemes=int8-wo", "--quantgate-models=flux-schnell",
                                "--collect-only", "-q")
    ids = [line.split("::", 1)[1] for line in result.outlines if "::" in line]
    assert ids == ["test_rounds", "test_calibration", "test_a[flux-schnell-tiny-int8-wo-eager-b1-cpu]",
                   "test_b[flux-schnell-tiny-int8-wo-eager-b1-cpu]"]
    result.stdout.fnmatch_lines(["plan: matrix*"])


@pytest.mark.parametrize(("args", "message"), [
    (["--quantgate-plan=nope"], "*--quantgate-plan: unknown plan 'nope'*"),
    (["--quantgate-plan=bad"], "*bad.toml: [[]options] names 'colour', which is no --quantgate option*"),
])
def test_a_bad_plan_choice_is_a_usage_error(pytester, tiny_cache, args, message):
    (pytester.path / "fixtures" / "plans").mkdir(parents=True)
    (pytester.path / "fixtures" / "plans" / "bad.toml").write_text(
        '[options]\ncolour = "red"\n[[select]]\nmodels = "*"\nschemes = "*"\n')
    pytester.makepyfile(TESTS)
    result = pytester.runpytest(*_args(tiny_cache), *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_plan_command_lists_the_groups_and_their_recorded_time(capsys, monkeypatch):
    from quantgate.cli import main

    monkeypatch.chdir(REPO)
    history = REPO / "tests" / "fixtures" / "history" / "h200-eager-run-a.json"
    assert main(["plan", "merge", "--durations", str(history)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan merge: every claim once")
    assert "flux-schnell-synthetic-bf16-eager-b1-cuda" in out and "sd35-medium-synthetic-gptq-w4a8-eager-b1-cuda" in out
    assert "tests in" in out and "expected" in out and "leaves: FLUX.1-dev" in out


def test_plan_dirs_is_the_repository_s_fixtures(tmp_path):
    assert plan_dirs(Path("/x")) == [Path("/x/fixtures/plans")]


COMPARISONS = """
import pytest

@pytest.mark.compares_cases(timing="transformer")
@pytest.mark.parametrize("baseline", ["bf16", "int8-dq"])
def test_cmp(case, baseline):
    pass

@pytest.mark.times("transformer")
def test_timed(case):
    pass
"""


def test_comparisons_run_after_every_group_and_need_their_baseline_timed(pytester, tiny_cache):
    pytester.makepyfile(COMPARISONS)
    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-models=flux-schnell",
                                "--quantgate-schemes=int8-wo,bf16", "--collect-only", "-q")
    ids = [line.split("::", 1)[1] for line in result.outlines if "::" in line]
    # collected before test_timed, run after both groups; int8-dq times nothing here: not generated
    assert ids == ["test_timed[flux-schnell-tiny-int8-wo-eager-b1-cpu]", "test_timed[flux-schnell-tiny-bf16-eager-b1-cpu]",
                   "test_cmp[flux-schnell-tiny-int8-wo-eager-b1-cpu-bf16]",
                   "test_cmp[flux-schnell-tiny-bf16-eager-b1-cpu-bf16]"], ids
    result.stdout.fnmatch_lines(["*2  test_cmp: int8-dq eager at batch 1 has no transformer timing in this selection*"])


def test_a_plan_leaves_out_the_harness_tests_it_names_and_counts_them(pytester, tiny_cache):
    (pytester.path / "fixtures" / "plans").mkdir(parents=True)
    (pytester.path / "fixtures" / "plans" / "small.toml").write_text(
        'harness_left_out = ["test_cal*"]\n' + PLAN)
    pytester.makepyfile(TESTS)
    result = pytester.runpytest(*_args(tiny_cache), "--quantgate-plan=small", "--collect-only", "-q")
    ids = [line.split("::", 1)[1] for line in result.outlines if "::" in line]
    assert "test_rounds" in ids and "test_calibration" not in ids
    assert "test_a[flux-schnell-tiny-bf16-eager-b1-cpu]" in ids
