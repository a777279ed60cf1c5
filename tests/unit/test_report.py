"""Reports and history comparison, from recorded benchmark JSON (real H200 and CPU runs)."""

import json
import shutil
import statistics

import pytest

from quantgate.cli import main
from quantgate.errors import ConfigFileError
from quantgate.history.compare import compare_runs, exit_code, history_files, judge_time
from quantgate.report.browser import find_browser, rendered_dom, screenshot
from quantgate.report.build import build_report, write_report
from quantgate.report.claims import evaluate, load_claims
from quantgate.report.document import Table, to_html, to_markdown
from quantgate.results import load_runs
from tests.conftest import REPO

H200_RUN = REPO / "reports" / "torchao-flux-h200-2026-11-21" / "benchmark.json"
HISTORY = REPO / "tests" / "fixtures" / "history"
PLANS = REPO / "fixtures" / "claims.toml"


@pytest.fixture(scope="module")
def runs():
    return load_runs([H200_RUN])


@pytest.fixture(scope="module")
def plans():
    return load_claims(PLANS)


def _criterion(plans, claim_start):
    return next(c for p in plans.groups for c in p.criteria if c.claim.startswith(claim_start))


def test_checklist_decides_from_verdicts_and_outcomes(runs, plans):
    assert evaluate(_criterion(plans, "FP8 row-wise + compile speeds up"), runs).status == "fail"
    assert evaluate(_criterion(plans, "FP8 (row-wise and tensor-wise) halves"), runs).status == "pass"
    batches = evaluate(_criterion(plans, "Measured at batch sizes"), runs)
    assert batches.status == "partial" and "no passing run at batch 4, 8" in batches.evidence[0]
    svdquant = evaluate(_criterion(plans, "3.5-3.6x less"), runs)
    assert svdquant.status == "not measured"


def test_recommendations_come_from_the_measured_data(runs, plans):
    doc = build_report(runs, plans, "H200")
    (recs,) = [s for s in doc.sections if s.title == "Recommendations"]
    lines = recs.blocks[0].items
    budget = plans.budgets[0]
    fitting = [r for r in runs.results if r.scope == "end_to_end" and r.batch == 1 and r.peak_allocated is not None
               and r.peak_allocated <= budget.bytes]
    best = min(fitting, key=lambda r: r.median)
    assert any(f"fastest within {budget.name}" in line and f"{best.scheme} ({best.variant}): {best.median:.3f} s" in line
               for line in lines)
    assert lines[-1].startswith("Image quality was not measured")


def test_html_and_markdown_twins_hold_the_same_tables(runs, plans, tmp_path):
    html_file, md_file = write_report(runs, plans, "H200 report", tmp_path)
    page, markdown = html_file.read_text(), md_file.read_text()
    doc = build_report(runs, plans, "H200 report")
    tables = [b for s in doc.sections for b in s.blocks if isinstance(b, Table)]
    assert page.count("<table>") == len(tables)
    separators = [line for line in markdown.splitlines() if line.startswith("|---")]
    assert len(separators) == len(tables)
    for table in tables:
        assert "| " + " | ".join(table.headers) + " |" in markdown
    for section in doc.sections:
        assert f"<h2>{section.title}</h2>" in page.replace("&amp;", "&") and f"## {section.title}" in markdown
    assert page.count("<svg") >= 3  # latency (x2) and memory charts, inline
    # Self-contained: nothing fetched when the page opens.
    assert "<script" not in page and "<link" not in page and 'src="http' not in page


def test_a_run_without_timings_still_reports(tmp_path, plans):
    data = json.loads(H200_RUN.read_text())
    data["benchmarks"] = []
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(data))
    page = to_html(build_report(load_runs([path]), plans, "empty"))
    assert "No timings in these runs." in page


@pytest.mark.skipif(find_browser() is None, reason="renders the report in headless Chromium: install Debian's "
                    "chromium (apt-get install chromium); .ci/run does")
def test_the_report_renders_in_a_real_browser(runs, plans, tmp_path):
    from PIL import Image, ImageStat

    html_file, _ = write_report(runs, plans, "H200 report", tmp_path)
    dom = rendered_dom(html_file)
    assert "Success criteria" in dom and "<svg" in dom and "fixtures/gates.toml" in dom
    png = screenshot(html_file, tmp_path / "report.png", width=1280, height=1600)
    image = Image.open(png).convert("L")
    assert image.size == (1280, 1600)
    assert statistics.mean(ImageStat.Stat(image).stddev) > 20  # text, tables and colour, not a blank page


def test_three_rounds_each_cannot_show_a_change():
    """Two real H200 runs of the same cases on two machines, 3 rounds per case: the rank test can
    never reach p < 0.05 with 3 and 3 rounds (its smallest two-sided p is 0.1), so nothing is decided."""
    base, new = load_runs([HISTORY / "h200-eager-run-a.json"]), load_runs([HISTORY / "h200-compile-run-b.json"])
    comparison = compare_runs(base, new, alpha=0.05)
    assert {c.verdict for c in comparison.times} == {"not enough data"}
    assert all(c.decided_by.startswith("3 and 3 rounds: the smallest two-sided Mann-Whitney p is 0.1")
               for c in comparison.times)
    assert exit_code(comparison) == 0
    assert "flux-schnell-synthetic-bf16-compile-b1-cuda (transformer)" in comparison.only_in_new


def test_a_real_regression_is_caught_and_explained():
    """Real CPU runs, 7 rounds each: 4 steps, then 48 (a scheduler-config style regression)."""
    base, new = load_runs([HISTORY / "cpu-4-steps.json"]), load_runs([HISTORY / "cpu-48-steps.json"])
    comparison = compare_runs(base, new, tolerance=0.05, alpha=0.05)
    verdicts = {c.key[1]: c for c in comparison.times}
    end_to_end = verdicts["end_to_end"]
    assert end_to_end.verdict == "regression" and end_to_end.test.p_value == pytest.approx(2 / 3432)  # 7 vs 7, disjoint
    assert end_to_end.decided_by.startswith("Mann-Whitney p=0.00058 (exact), new/base 6.105 [")
    assert "beyond the 5% tolerance" in end_to_end.decided_by
    # One forward's code did not change, but the second run's forwards were 5.6% slower on that
    # shared CPU, and the rank test sees it (p = 0.007). Its ratio's interval [1.027, 1.070]
    # reaches below the 5% tolerance, so it decides nothing (it was a false regression when the
    # verdict went by the medians alone); CPU-tier runs still deserve a larger tolerance.
    forward = verdicts["transformer"]
    assert forward.verdict == "no change" and forward.test.p_value < 0.01 and 1.05 < forward.ratio < 1.06
    assert forward.interval[0] < 1.05 and "but its 95% interval reaches within the 5% tolerance" in forward.decided_by
    assert exit_code(comparison) == 1  # the end-to-end regression
    loose = {c.key[1]: c for c in compare_runs(base, new, tolerance=0.10, alpha=0.05).times}
    assert loose["end_to_end"].verdict == "regression" and loose["transformer"].verdict == "no change"
    assert "within the 10% tolerance" in loose["transformer"].decided_by


def test_judging_a_significant_move_inside_the_tolerance():
    from quantgate.results.reader import result_from_benchmark

    bench = json.loads((HISTORY / "cpu-4-steps.json").read_text())["benchmarks"][1]  # the forward, 7 rounds
    base = result_from_benchmark(bench)
    shifted = dict(bench, stats={**bench["stats"], "data": [d * 1.03 for d in bench["stats"]["data"]],
                                 **{k: bench["stats"][k] * 1.03 for k in ("min", "max", "median", "q1", "q3", "mean")}})
    new = result_from_benchmark(shifted)
    change = judge_time(base, new, tolerance=0.05, alpha=0.05)
    assert change.test.p_value < 0.05  # the rounds tell the 3% apart
    assert change.verdict == "no change" and "within the 5% tolerance" in change.decided_by
    # below a 2% tolerance the median moved, but the interval [1.009, 1.050] reaches into it
    assert judge_time(base, new, tolerance=0.02, alpha=0.05).verdict == "no change"
    assert judge_time(base, new, tolerance=0.005, alpha=0.05).verdict == "regression"
    # The end-to-end rounds of the same run start with two slow ones: 8% slower cannot be told apart.
    bench = json.loads((HISTORY / "cpu-4-steps.json").read_text())["benchmarks"][0]
    slower = dict(bench, stats={**bench["stats"], "data": [d * 1.08 for d in bench["stats"]["data"]]})
    noisy = judge_time(result_from_benchmark(bench), result_from_benchmark(slower), tolerance=0.05, alpha=0.05)
    assert noisy.verdict == "no change" and "p >= alpha 0.05, the runs cannot be told apart" in noisy.decided_by


def test_comparing_across_gpu_classes_needs_a_flag():
    gpu, cpu = load_runs([HISTORY / "h200-eager-run-a.json"]), load_runs([HISTORY / "cpu-4-steps.json"])
    with pytest.raises(ConfigFileError, match="different GPU classes \\(hopper vs cpu\\)"):
        compare_runs(gpu, cpu)
    comparison = compare_runs(gpu, cpu, allow_cross_hardware=True)
    assert any(d.startswith("gpu: NVIDIA H200 -> None") for d in comparison.machine_differences)


def test_compare_reads_a_pytest_benchmark_storage_directory(tmp_path, capsys):
    storage = tmp_path / ".benchmarks" / "Linux-CPython-3.11-64bit"
    storage.mkdir(parents=True)
    shutil.copy(HISTORY / "cpu-48-steps.json", storage / "0002_b_uncommitted-changes.json")
    shutil.copy(HISTORY / "cpu-4-steps.json", storage / "0001_a_uncommitted-changes.json")
    assert [p.name for p in history_files(tmp_path / ".benchmarks")][0].startswith("0001")

    # a CPU-tier comparison: 10% tolerance (the unchanged forward drifted 5.6% between these runs)
    assert main(["compare", "--storage", str(tmp_path / ".benchmarks"), "-o", str(tmp_path / "cmp"),
                 "--tolerance", "10"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "1 regression(s)" in out and "NO CHANGE" in out
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Trends" in page and page.count("<svg") == 2  # one trend per case (end to end, transformer)
    assert main(["compare", str(HISTORY / "h200-eager-run-a.json"), str(HISTORY / "h200-compile-run-b.json")]) == 0


def test_report_cli_writes_both_files(tmp_path, capsys):
    assert main(["report", str(H200_RUN), "-o", str(tmp_path), "--claims", str(PLANS)]) == 0
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    assert main(["report", str(H200_RUN), "-o", str(tmp_path), "--claims", str(tmp_path / "none.toml")]) == 2
    assert "none.toml not found" in capsys.readouterr().err


def test_a_malformed_claims_file_names_the_criterion(tmp_path):
    path = tmp_path / "claims.toml"
    path.write_text('[[claims]]\nname = "p"\n[[claims.criterion]]\nclaim = "fast"\nmodel = "flux-dev"\n')
    with pytest.raises(ConfigFileError, match="criterion 'fast' needs a claim and a metric or test"):
        load_claims(path)
    path.write_text('[[plan]]\nname = "p"\n')  # the layout before claims.toml: refused, not read as empty
    with pytest.raises(ConfigFileError, match="unknown table 'plan'"):
        load_claims(path)


def test_markdown_escapes_pipes():
    from quantgate.report.document import Document, Section

    text = to_markdown(Document("t", [Section("s", [Table(["a"], [["x | y"]])])]))
    assert "x \\| y" in text


def test_the_stages_of_a_call_are_shown_under_its_end_to_end_timing(tmp_path, plans):
    data = json.loads(H200_RUN.read_text())
    bench = next(b for b in data["benchmarks"] if b["extra_info"].get("scope") == "end_to_end")
    bench["extra_info"]["stages"] = {"text_encoding_s": 0.012, "denoising_steps_s": [0.1, 0.1, 0.1, 0.1],
                                     "denoising_s": 0.4, "vae_decode_s": 0.05, "steps": 4, "wall_s": 0.48,
                                     "other_s": 0.018, "clock": "cuda events"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    doc = build_report(load_runs([path]), plans, "stages")
    tables = [b for s in doc.sections for b in s.blocks if isinstance(b, Table) and b.headers[0] == "stages of one call"]
    assert len(tables) == 1 and tables[0].rows[0][1:] == ["0.0120", "0.4000", "4 x 100.0", "0.0500", "0.0180",
                                                           "0.4800"]
