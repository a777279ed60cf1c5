"""GPU memory budgets without a GPU: parsing, the allocator cap on a simulated device, the check."""

from __future__ import annotations

import json

import pytest

from quantgate.budget import (
    BudgetTooSmall,
    DeviceMemory,
    budget_label,
    fraction_used,
    parse_budget,
    plan_cap,
)
from quantgate.gates import GateBook
from tests.conftest import REPO

GIB = 2**30
H200 = 140 * GIB  # what torch.cuda.mem_get_info reports on an H200, about
CONTEXT = GIB // 2  # a CUDA context and library handles, outside torch's allocator


class SimulatedAllocator:
    """torch's caching allocator under ``set_per_process_memory_fraction``: reserving past
    ``fraction * total`` raises out-of-memory, as ``torch.cuda.OutOfMemoryError`` does."""

    def __init__(self, total: int, fraction: float | None):
        self.limit = total if fraction is None else int(fraction * total)
        self.reserved = self.peak = 0

    def reserve(self, size: int) -> None:
        if self.reserved + size > self.limit:
            raise MemoryError(f"out of memory: {self.reserved + size} > {self.limit} allowed")
        self.reserved += size
        self.peak = max(self.peak, self.reserved)

    def free(self, size: int) -> None:
        self.reserved -= size


def test_budget_parsing_and_labels():
    assert parse_budget("16GiB") == 16 * GIB
    assert parse_budget("24GB") == 24 * 10**9
    assert parse_budget("16000MiB") == 16000 * 2**20
    for bad in ("sixteen", "16 GiB of RAM", "-16GiB", "0"):
        with pytest.raises(ValueError, match="not a size"):
            parse_budget(bad)
    assert budget_label(16 * GIB) == "16GiB"
    assert budget_label(16000 * 2**20) == "16000MiB"
    assert budget_label(24 * 10**9) == "24000000000B"


def test_cap_leaves_room_for_memory_outside_torch():
    device = DeviceMemory(total=H200, free=H200 - CONTEXT, reserved=0)
    cap = plan_cap(16 * GIB, device)
    assert cap.outside_torch == CONTEXT
    assert cap.fraction == pytest.approx((16 * GIB - CONTEXT) / H200)
    # Memory torch already holds is torch's, not outside it.
    busy = DeviceMemory(total=H200, free=H200 - CONTEXT - 3 * GIB, reserved=3 * GIB)
    assert plan_cap(16 * GIB, busy).fraction == cap.fraction


def test_no_cap_when_the_budget_is_the_whole_device_and_an_error_when_it_is_used_up():
    device = DeviceMemory(total=16 * GIB, free=15 * GIB, reserved=0)
    cap = plan_cap(24 * GIB, device)
    assert cap.fraction is None and "nothing to cap" in cap.note
    with pytest.raises(BudgetTooSmall, match="used up"):
        plan_cap(GIB // 4, DeviceMemory(total=H200, free=H200 - CONTEXT, reserved=0))


def test_the_cap_makes_a_case_that_needs_more_than_the_budget_run_out_of_memory():
    cap = plan_cap(16 * GIB, DeviceMemory(total=H200, free=H200 - CONTEXT, reserved=0))
    fits, too_big = SimulatedAllocator(H200, cap.fraction), SimulatedAllocator(H200, cap.fraction)
    fits.reserve(12 * GIB)  # quantized weights
    fits.reserve(3 * GIB)  # activations
    assert fraction_used(fits.peak, cap.outside_torch, cap.budget) <= 1.0
    too_big.reserve(12 * GIB)
    with pytest.raises(MemoryError, match="out of memory"):
        too_big.reserve(4 * GIB)
    uncapped = SimulatedAllocator(H200, None)  # the same case on the big card, no budget
    uncapped.reserve(16 * GIB)
    assert fraction_used(uncapped.peak, CONTEXT, 16 * GIB) > 1.0


def test_the_budget_gate_fails_a_case_that_exceeded_the_budget_with_measured_vs_required():
    book = GateBook.load(REPO / "fixtures" / "gates")
    attrs = {"model": "flux-schnell", "source": "synthetic", "scheme": "svdquant-ref", "variant": "eager",
             "batch": 1, "hardware": "hopper", "budget": "16GiB"}
    gate = book.lookup("gpu_budget_fraction_used", attrs)
    assert gate is not None and gate.max == 1.0
    # Fitted under the cap, but memory outside torch grew past the budget's headroom.
    verdict = gate.check(fraction_used(int(15.5 * GIB), GIB, 16 * GIB), subject="flux-schnell/svdquant-ref")
    assert not verdict.passed
    assert "measured 1.031, required <= 1" in verdict.message
    assert book.lookup("gpu_budget_fraction_used", {**attrs, "budget": None}) is None  # no budget: no gate


@pytest.fixture
def args(tiny_cache):
    return ["-p", "quantgate.plugin", "-p", "no:cacheprovider", f"--quantgate-cache-dir={tiny_cache}",
            f"--quantgate-gates={REPO / 'fixtures' / 'gates'}",
            f"--quantgate-prompts={REPO / 'fixtures' / 'prompts' / 'gate.txt'}"]


@pytest.mark.parametrize("option", ["--quantgate-gpu-budget=sixteen", "--quantgate-cache-max-size=-5GiB"])
def test_nonsense_sizes_are_usage_errors(pytester, args, option):
    pytester.makepyfile("def test_x(case):\n    assert case\n")
    result = pytester.runpytest(*args, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{option.split('=')[0]}: not a size*"])


def test_the_budget_is_recorded_in_the_json_and_said_unenforced_off_cuda(pytester, args, monkeypatch):
    import quantgate.plugin.budget as bp

    monkeypatch.setattr(bp, "cuda_available", lambda: False)  # the same on a GPU machine: this is a CPU test
    pytester.makepyfile("def test_x(case, gpu_budget, quantgate_run, benchmark):\n"
                        "    assert quantgate_run.session_attrs == {'budget': '16GiB'}\n"
                        "    assert gpu_budget.cap is None\n"
                        "    benchmark(lambda: None)\n")
    out = pytester.path / "out.json"
    result = pytester.runpytest(*args, "-m", "cpu", "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16",
                                "--quantgate-gpu-budget=16GiB", f"--benchmark-json={out}")
    result.assert_outcomes(passed=1)
    budget = json.loads(out.read_text())["quantgate"]["gpu_budget"]
    assert budget["budget"] == "16GiB" and budget["budget_bytes"] == 16 * GIB
    assert budget["not_enforced"].startswith("no allocator cap:")


def test_cache_max_size_evicts_least_recently_used_at_session_end(pytester, args, tmp_path):
    import os
    import time

    cache = tmp_path / "cache"
    for i, age in enumerate((3, 2, 1)):  # days
        entry = cache / "quantized" / f"q{i}"
        entry.mkdir(parents=True)
        (entry / "w.bin").write_bytes(b"x" * 1000)
        os.utime(entry, (time.time() - age * 86400,) * 2)
    pytester.makepyfile("def test_x(case):\n    assert case\n")
    result = pytester.runpytest(*args, f"--quantgate-cache-dir={cache}", "--quantgate-cache-max-size=1500",
                                "-m", "cpu", "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*quantgate cache: evicted 2 entries*"])
    assert sorted(p.name for p in (cache / "quantized").iterdir()) == ["q2"]


def _case(scheme: str, variant: str):
    from quantgate.cases import Selection, make_case
    from quantgate.models import get_model

    spec = get_model("flux-schnell")
    return make_case(spec, "synthetic", scheme, variant, 1, "cuda", Selection(models=[spec.name], schemes=[scheme]))


def test_the_offload_baseline_is_the_fastest_bf16_offload_variant_that_fits():
    from quantgate.plugin.budget import GpuBudget
    from quantgate.records import Measurement, Records

    state, records = GpuBudget(budget=16 * GIB), Records()
    svdq = _case("svdquant-ref", "eager")
    assert state.offload_baseline(svdq, records)[0] is None
    assert "no bf16 offload variant" in state.offload_baseline(svdq, records)[2]
    # Group offload is fastest but does not fit; of the two that fit, model offload is faster.
    for variant, median, fraction in (("group-offload", 20.0, 1.02), ("model-offload", 30.0, 0.97),
                                      ("sequential-offload", 90.0, 0.40)):
        case = _case("bf16", variant)
        records.add(Measurement(case, "end_to_end", median, {}, None))
        state.record_fraction(case, fraction)
    variant, timing, _ = state.offload_baseline(svdq, records)
    assert (variant, timing.median_s) == ("model-offload", 30.0)
    state.record_fraction(svdq, 0.71)
    assert state.fits() == {
        "flux-schnell/synthetic/bf16/b1": {"group-offload": 1.02, "model-offload": 0.97, "sequential-offload": 0.4},
        "flux-schnell/synthetic/svdquant-ref/b1": {"eager": 0.71},
    }


def test_only_a_new_pipeline_of_an_offline_quantized_scheme_loads_uncapped():
    from quantgate.plugin.budget import offline_window
    from quantgate.schemes import get_scheme

    cap = plan_cap(16 * GIB, DeviceMemory(total=H200, free=H200 - CONTEXT, reserved=0))
    svdq, nf4 = _case("svdquant-ref", "eager"), _case("bnb-nf4", "model-offload")
    assert offline_window(cap, get_scheme("svdquant-ref"), None, svdq)
    assert not offline_window(cap, get_scheme("svdquant-ref"), svdq.pipeline_key, svdq)  # already loaded
    assert not offline_window(None, get_scheme("svdquant-ref"), None, svdq)  # no cap in this session
    # Quantizing while loading (bnb, torchao) is what the small card does: capped. So is
    # loading nunchaku's shipped 4-bit checkpoint, first-block cache or not.
    for scheme in ("bf16", "bnb-nf4", "fp8-row", "svdq-int4-fbcache"):
        assert not offline_window(cap, get_scheme(scheme), None, nf4), scheme


def test_the_report_shows_what_fit_the_budget_with_peak_latency_and_speedup(tmp_path):
    from quantgate.report.budget import budget_section
    from quantgate.report.document import Table
    from quantgate.results import load_runs

    data = json.loads((REPO / "tests" / "fixtures" / "history" / "h200-eager-run-a.json").read_text())
    e2e = [b for b in data["benchmarks"] if b["extra_info"].get("scope") == "end_to_end"]
    assert e2e, "the recorded run has end-to-end timings"
    case = e2e[0]["extra_info"]["id"]
    verdict = {"case": case, "budget": "16GiB", "min": None, "gate": "gates.toml:1", "why": "fits"}
    data["quantgate"]["verdicts"] = [
        {**verdict, "metric": "gpu_budget_fraction_used", "value": 0.91, "max": 1.0, "passed": True},
        {**verdict, "case": "other-case", "metric": "gpu_budget_fraction_used", "value": 1.2, "max": 1.0,
         "passed": False},
        {**verdict, "metric": "end_to_end_speedup_vs_bf16_offload", "value": 3.5, "max": None, "passed": None},
    ]
    data["quantgate"]["gpu_budget"] = {"budget": "16GiB", "offload_baseline_of": {case: "group-offload"},
                                       "cap": {"allocator_fraction": 0.11, "device_total_bytes": 140 * GIB,
                                               "outside_torch_bytes": CONTEXT}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    runs = load_runs([path])
    assert budget_section(load_runs([REPO / "tests" / "fixtures" / "history" / "h200-eager-run-a.json"])) is None
    section = budget_section(runs)
    table = next(b for b in section.blocks if isinstance(b, Table))
    rows = {row[0]: row for row in table.rows}
    median = next(r.median for r in runs.results if r.case_id == case and r.scope == "end_to_end")
    assert rows[case][2:4] == ["0.910", "fits"] and rows[case][5] == f"{median:.3f}"
    assert rows[case][6] == "3.50x vs bf16 group-offload"
    assert rows["other-case"][3] == "does not fit" and table.row_classes == ["pass", "fail"]


def test_compact_round_trips_the_modules_on_the_gpu_through_the_cpu_and_frees_in_between(monkeypatch):
    """After an offline quantization the pipeline is re-placed as a fresh load would place it."""
    import types

    import torch

    import quantgate.measure.memory as memory
    from quantgate.plugin.budget import compact

    events = []

    class Module(torch.nn.Module):
        def __init__(self, name, device):
            super().__init__()
            self.name, self.where = name, device

        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device(self.where))

        def to(self, device):
            events.append((self.name, str(device)))
            self.where = str(device)
            return self

    monkeypatch.setattr(memory, "release_memory", lambda device: events.append(("release", device)))
    pipe = types.SimpleNamespace(components={"transformer": Module("transformer", "cuda"), "scheduler": object(),
                                             "text_encoder": Module("text_encoder", "cpu"),
                                             "vae": Module("vae", "cuda")})
    assert compact(pipe, "cuda") == ["transformer", "vae"]
    assert events == [("transformer", "cpu"), ("vae", "cpu"), ("release", "cuda"),
                      ("transformer", "cuda"), ("vae", "cuda")]  # the offloaded encoder is left alone
