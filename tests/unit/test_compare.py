"""quantgate compare on tiny benchmark JSON files with raw rounds: the rank test decides each case."""

import json
import random
import re
import statistics
import sys

import pytest

from quantgate.cli import main
from quantgate.errors import ConfigFileError, QuantgateError
from quantgate.history.compare import (
    HOST_BOUND,
    IMPROVEMENT,
    NO_CHANGE,
    NOT_ENOUGH_DATA,
    REGRESSION,
    as_text,
    compare_runs,
    exit_code,
    load_thresholds,
    nothing_to_compare,
    shipped_thresholds,
)
from quantgate.report.comparison import render
from quantgate.report.document import to_markdown
from quantgate.results import load_runs
from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CASES = ("flux-schnell-synthetic-bf16-eager-b1-cuda", "flux-schnell-synthetic-int8-wo-eager-b1-cuda")
H200 = {"gpu": "NVIDIA H200", "hardware_class": "hopper", "nvidia_driver": "580.159.04", "cuda_runtime": "13.0",
        "python_version": "3.12.3", "quantgate": "0.1.0", "cpu": {"brand_raw": "Intel(R) Xeon(R) Processor"},
        "libraries": {"torch": "2.11.0", "diffusers": "0.42.1", "torchao": "0.18.0"}}


def _rounds(seed, count=15, scale=1.0, noise=0.005, median=0.2):
    rng = random.Random(seed)
    return [median * scale * (1 + rng.gauss(0, noise)) for _ in range(count)]


def _bench(case, scope, data, where="stats", more=None):
    q1, _, q3 = statistics.quantiles(data, n=4) if len(data) > 1 else (data[0],) * 3
    stats = {"min": min(data), "max": max(data), "mean": statistics.fmean(data), "median": statistics.median(data),
             "q1": q1, "q3": q3, "iqr": q3 - q1, "stddev": statistics.stdev(data) if len(data) > 1 else 0.0,
             "rounds": len(data), "iterations": 1}
    extra = {"id": case, "scope": scope, "model": "flux-schnell", "source": "synthetic", "scheme": case.split("-")[3],
             "variant": "eager", "batch": 1, "device": "cuda", "hardware": "hopper",
             "denoiser_footprint_bytes": 6323671168, **(more or {})}
    if where == "stats":
        stats["data"] = list(data)
    elif where == "extra_info":
        extra["round_seconds"] = [round(d, 7) for d in data]
    name = "test_transformer_forward" if scope == "transformer" else "test_prompt_to_image"
    return {"name": f"{name}[{case}]", "fullname": f"tests/test_performance.py::{name}[{case}]", "stats": stats,
            "extra_info": extra}


def _run(tmp_path, label, rounds_by_case, machine=None, where="stats", extra=None):
    """A benchmark JSON of one run: ``rounds_by_case`` maps (case, scope) to its rounds; ``extra``
    is added to every benchmark's extra_info."""
    data = {"datetime": "2026-12-03T10:00:00+00:00", "commit_info": {"id": f"{label}-0000000"},
            "machine_info": {**H200, **(machine or {})},
            "benchmarks": [_bench(case, scope, rounds, where, extra) for (case, scope), rounds in rounds_by_case.items()],
            "quantgate": {"version": "0.1.0", "schema": 1, "verdicts": [], "outcomes": {}}}
    path = tmp_path / f"{label}.json"
    path.write_text(json.dumps(data))
    return path


def _compare(tmp_path, base_rounds, new_rounds, base_extra=None, new_extra=None, **kwargs):
    key = (CASES[0], "transformer")
    base = load_runs([_run(tmp_path, "base", {key: base_rounds}, extra=base_extra)])
    new = load_runs([_run(tmp_path, "new", {key: new_rounds}, extra=new_extra)])
    comparison = compare_runs(base, new, **kwargs)
    (change,) = comparison.times
    return comparison, change


def test_a_over_a_is_no_change(tmp_path):
    """The same distribution measured twice (different seeds, 15 rounds each, 0.5% noise)."""
    keys = [(case, scope) for case in CASES for scope in ("transformer", "end_to_end")]
    base = load_runs([_run(tmp_path, "base", {k: _rounds(seed=i) for i, k in enumerate(keys)})])
    new = load_runs([_run(tmp_path, "new", {k: _rounds(seed=100 + i) for i, k in enumerate(keys)})])
    comparison = compare_runs(base, new)
    assert [c.verdict for c in comparison.times] == [NO_CHANGE] * 4
    assert all(c.test is not None and c.test.method == "normal approximation" for c in comparison.times)  # 15 + 15
    assert all(c.interval[0] <= 1.0 <= c.interval[1] for c in comparison.times)
    assert exit_code(comparison) == 0 and not comparison.machine_differences


def test_a_five_percent_shift_over_half_a_percent_noise_is_a_regression(tmp_path):
    # A 5% shift against the default 5% tolerance would be decided by the noise of the medians
    # themselves; a 3% tolerance makes the test about the rank test.
    comparison, change = _compare(tmp_path, _rounds(1), _rounds(2, scale=1.05), tolerance=0.03)
    alpha = load_thresholds().alpha
    assert change.verdict == REGRESSION and change.test.p_value < alpha and change.test.p_value < 1e-4
    assert change.interval[0] < 1.05 < change.interval[1]
    assert change.decided_by.startswith(f"Mann-Whitney p={change.test.p_value:.2g} (normal approximation), "
                                        f"new/base {change.ratio:.3f} [{change.interval[0]:.3f}, "
                                        f"{change.interval[1]:.3f}]")
    assert "beyond the 3% tolerance" in change.decided_by
    assert exit_code(comparison) == 1 and comparison.regressions == [change]
    _, faster = _compare(tmp_path, _rounds(1), _rounds(2, scale=0.95), tolerance=0.03)
    assert faster.verdict == IMPROVEMENT and re.search(r": p < alpha \S+ and 5\.\d% faster", faster.decided_by)


def test_a_significant_move_within_the_tolerance_is_no_change(tmp_path):
    _, change = _compare(tmp_path, _rounds(1), _rounds(2, scale=1.02))
    tolerance = load_thresholds().tolerance
    assert tolerance > 0.025  # the file's default; this shift is below it
    assert change.verdict == NO_CHANGE and change.test.p_value < 1e-4
    assert f"within the {tolerance * 100:g}% tolerance" in change.decided_by


def test_a_move_whose_interval_reaches_into_the_tolerance_decides_nothing(tmp_path):
    """Significant and 6% slower on the medians, but noisy enough that the ratio's 95% interval
    reaches below 1.05: as a speedup gate passes on its interval's lower bound, a regression
    needs the whole interval beyond the tolerance (the 2026-12-04 H200 A/A pair had two such)."""
    comparison, change = _compare(tmp_path, _rounds(1, noise=0.03), _rounds(6, noise=0.03, scale=1.06))
    assert change.test.p_value < load_thresholds().alpha and change.ratio > 1.05
    assert change.interval[0] <= 1.05 < change.interval[1]
    assert change.verdict == NO_CHANGE and exit_code(comparison) == 0
    assert "but its 95% interval reaches within the 5% tolerance" in change.decided_by
    # the same move measured tightly is a regression
    assert _compare(tmp_path, _rounds(1), _rounds(2, scale=1.08))[1].verdict == REGRESSION


def test_a_launch_bound_slowdown_with_unchanged_gpu_work_is_host_bound(tmp_path):
    """Measured on an H200 (same commit, same machine): an SD3.5 LoRA forward at batch 1 went from
    92 to 173 ms while its kernels took 49.0 and 49.3 ms: the host's launching moved."""
    lb = {"launch_bound": True, "gpu_busy_fraction": 0.53, "gpu_busy_seconds": 0.0490}
    slow = {"launch_bound": True, "gpu_busy_fraction": 0.28, "gpu_busy_seconds": 0.0493}
    comparison, change = _compare(tmp_path, _rounds(1, median=0.092), _rounds(2, median=0.173), lb, slow)
    assert change.verdict == HOST_BOUND and exit_code(comparison) == 0 and not comparison.regressions
    assert "its kernels took 49.0 -> 49.3 ms (+0.6%), within the 5% tolerance" in change.decided_by
    assert "1 host-bound" in as_text(comparison)
    # on a quiet dedicated runner the wall time is judged anyway
    judged, change = _compare(tmp_path, _rounds(1, median=0.092), _rounds(2, median=0.173), lb, slow,
                              judge_host_bound=True)
    assert change.verdict == REGRESSION and exit_code(judged) == 1 and "--judge-host-bound" in change.decided_by
    # the GPU's work moved too: a regression, however launch bound
    heavier = {**slow, "gpu_busy_seconds": 0.0900}
    assert _compare(tmp_path, _rounds(1, median=0.092), _rounds(2, median=0.173), lb, heavier)[1].verdict == REGRESSION
    # a GPU-bound path is judged on its wall time
    bound = {"launch_bound": False, "gpu_busy_fraction": 0.97, "gpu_busy_seconds": 0.089}
    assert _compare(tmp_path, _rounds(1, median=0.092), _rounds(2, median=0.173), bound,
                    {**bound, "gpu_busy_seconds": 0.090})[1].verdict == REGRESSION


def test_the_command_passes_judge_host_bound(tmp_path, capsys):
    lb = {"launch_bound": True, "gpu_busy_fraction": 0.5, "gpu_busy_seconds": 0.05}
    key = (CASES[0], "transformer")
    base = _run(tmp_path, "base", {key: _rounds(1, median=0.1)}, extra=lb)
    new = _run(tmp_path, "new", {key: _rounds(2, median=0.2)}, extra=lb)
    assert main(["compare", str(base), str(new)]) == 0
    assert "HOST-BOUND" in capsys.readouterr().out
    assert main(["compare", str(base), str(new), "--judge-host-bound"]) == 1
    assert "REGRESSION" in capsys.readouterr().out


def test_exact_test_for_small_samples(tmp_path):
    _, change = _compare(tmp_path, _rounds(1, count=4), _rounds(2, count=4, scale=1.5))
    assert change.verdict == REGRESSION and change.test.method == "exact"
    assert change.test.p_value == pytest.approx(2 / 70)  # 4 and 4 rounds, completely separated


def test_three_rounds_each_are_not_enough_data(tmp_path):
    """Even a 50% slowdown: with 3 and 3 rounds the smallest two-sided p is 2 / C(6, 3) = 0.1."""
    comparison, change = _compare(tmp_path, _rounds(1, count=3), _rounds(2, count=3, scale=1.5), alpha=0.05)
    assert change.verdict == NOT_ENOUGH_DATA and change.test is None
    assert change.decided_by.startswith("3 and 3 rounds: the smallest two-sided Mann-Whitney p is 0.1, not below "
                                        "alpha 0.05 (needs 4 rounds each); median +49.3%")
    assert exit_code(comparison) == 0 and comparison.undecided == [change]
    # 3 and 4 still cannot (2 / 35 = 0.057); a looser alpha can
    assert _compare(tmp_path, _rounds(1, count=3), _rounds(2, count=4, scale=1.5),
                    alpha=0.05)[1].verdict == NOT_ENOUGH_DATA
    assert _compare(tmp_path, _rounds(1, count=3), _rounds(2, count=3, scale=1.5), alpha=0.15)[1].verdict == REGRESSION


def test_rounds_from_quantgate_extra_info_when_pytest_benchmark_kept_none(tmp_path):
    key = (CASES[0], "transformer")
    base = load_runs([_run(tmp_path, "base", {key: _rounds(1)}, where="extra_info")])
    assert "data" not in base.data["benchmarks"][0]["stats"]
    assert base.results[0].round_times == tuple(round(d, 7) for d in _rounds(1))
    new = load_runs([_run(tmp_path, "new", {key: _rounds(2, scale=1.2)}, where="extra_info")])
    assert compare_runs(base, new).times[0].verdict == REGRESSION
    bare = load_runs([_run(tmp_path, "bare", {key: _rounds(2, scale=1.2)}, where="nowhere")])
    (change,) = compare_runs(base, bare).times
    assert change.verdict == NOT_ENOUGH_DATA and "no raw rounds in the new run's JSON" in change.decided_by


def test_different_gpu_classes_are_refused_and_other_differences_listed(tmp_path):
    key = (CASES[0], "transformer")
    base = load_runs([_run(tmp_path, "base", {key: _rounds(1)})])
    a100 = load_runs([_run(tmp_path, "a100", {key: _rounds(2)}, machine={"gpu": "NVIDIA A100", "hardware_class": "ampere"})])
    with pytest.raises(ConfigFileError, match=r"different GPU classes \(hopper vs ampere\).*--allow-cross-hardware"):
        compare_runs(base, a100)
    assert "gpu: NVIDIA H200 -> NVIDIA A100" in compare_runs(base, a100, allow_cross_hardware=True).machine_differences
    upgraded = load_runs([_run(tmp_path, "upgraded", {key: _rounds(2)}, machine={
        "libraries": {**H200["libraries"], "torch": "2.12.0"}, "python_version": "3.12.4"})])
    assert compare_runs(base, upgraded).machine_differences == ["python_version: 3.12.3 -> 3.12.4",
                                                               "torch: 2.11.0 -> 2.12.0"]


def test_a_run_compared_with_itself_or_with_nothing_in_common_says_so(tmp_path, capsys):
    run = _run(tmp_path, "base", {(CASES[0], "transformer"): _rounds(1)})
    assert main(["compare", str(run), str(run)]) == 2
    assert "are the same run" in capsys.readouterr().err
    other = _run(tmp_path, "other", {(CASES[1], "transformer"): _rounds(1)})
    assert main(["compare", str(run), str(other)]) == 2
    assert "have no case in common: nothing was compared" in capsys.readouterr().err
    base, new = load_runs([run]), load_runs([other])
    assert nothing_to_compare(base, new, compare_runs(base, new)) is not None


def test_the_thresholds_are_data_shipped_with_the_package(tmp_path, monkeypatch, capsys):
    fixture = REPO / "fixtures" / "compare.toml"
    assert shipped_thresholds().resolve() == fixture.resolve()  # quantgate/data links to the one copy
    table = tomllib.loads(fixture.read_text())["compare"]
    thresholds = load_thresholds()
    assert (thresholds.alpha, thresholds.tolerance, thresholds.memory_tolerance) == (
        table["alpha"], table["tolerance"], table["memory_tolerance"])
    base = _run(tmp_path, "base", {(CASES[0], "transformer"): _rounds(1)})
    new = _run(tmp_path, "new", {(CASES[0], "transformer"): _rounds(2, scale=1.02)})
    monkeypatch.chdir(tmp_path)  # outside the repository: the shipped file
    assert main(["compare", str(base), str(new)]) == 0
    assert f"within the {table['tolerance'] * 100:g}% tolerance" in capsys.readouterr().out
    assert main(["compare", str(base), str(new), "--tolerance", "1"]) == 1  # the flag overrides the file
    assert "beyond the 1% tolerance" in capsys.readouterr().out
    assert main(["compare", str(base), str(new), "--alpha", "1.5"]) == 2
    assert "alpha must be between 0 and 1" in capsys.readouterr().err
    mine = tmp_path / "compare.toml"
    mine.write_text("[compare]\nalpha = 0.05\ntolerance = 0.05\nmemory_tolerance = 0.01\nfactor = 1.1\n")
    assert main(["compare", str(base), str(new), "--thresholds", str(mine)]) == 2
    assert "compare.toml:5 [factor]: unknown key 'factor'" in capsys.readouterr().err
    mine.write_text("[compare]\nalpha = 0.05\ntolerance = 0.05\n")
    with pytest.raises(ConfigFileError, match=r"\[compare\] needs memory_tolerance"):
        load_thresholds(mine)
    mine.write_text("[compare]\nalpha = 0\ntolerance = 0.05\nmemory_tolerance = 0.01\n")
    with pytest.raises(QuantgateError, match="alpha must be between 0 and 1"):
        load_thresholds(mine)


def test_the_report_and_the_terminal_name_the_verdicts_and_the_rule(tmp_path):
    keys = {(CASES[0], "transformer"): (_rounds(1), _rounds(2, scale=1.2)),
            (CASES[0], "end_to_end"): (_rounds(3), _rounds(4)),
            (CASES[1], "transformer"): (_rounds(5, count=3), _rounds(6, count=3))}
    base = load_runs([_run(tmp_path, "base", {k: b for k, (b, _) in keys.items()})])
    new = load_runs([_run(tmp_path, "new", {k: n for k, (_, n) in keys.items()})])
    comparison = compare_runs(base, new)
    text = as_text(comparison).splitlines()
    assert [line.split()[0] for line in text[1:4]] == ["REGRESSION", "NOT", "NO"]  # regressions first
    assert text[-1] == ("1 regression(s) (1 timing, 0 memory or quality); timings: 0 improvement(s), 1 no change, "
                        "1 not enough data")
    markdown = to_markdown(render(comparison))
    for verdict in (REGRESSION, NO_CHANGE, NOT_ENOUGH_DATA):
        assert f"| {verdict} |" in markdown
    assert "Mann-Whitney U test" in markdown and "compare.toml" in markdown and "| 15 / 15 |" in markdown


GPU_AB = REPO / "reports" / "timing-ab-h200-2026-12-05" / "ab"


@pytest.mark.parametrize("new, verdict, code", [("b", REGRESSION, 1), ("a2", NO_CHANGE, 0)],
                         ids=["planted-matmuls-are-flagged", "a-rerun-is-no-change"])
def test_the_committed_h200_timing_pairs_are_judged_from_their_rounds(new: str, verdict: str, code: int):
    """The H200's A/B (b: tests/planted_regression.py's 8 matmuls a block) and A/A (a2: the same
    commit again) pairs, as pytest-benchmark wrote them: compare decides both from the raw rounds."""
    base = load_runs([GPU_AB / "a" / "benchmark.json"])
    comparison = compare_runs(base, load_runs([GPU_AB / new / "benchmark.json"]))
    assert {c.verdict for c in comparison.times} == {verdict} and len(comparison.times) == 2
    assert exit_code(comparison) == code and not comparison.machine_differences
