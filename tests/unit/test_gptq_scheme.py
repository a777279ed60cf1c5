"""GPTQ / RTN W4A8 on the tiny SD3.5 Medium pipeline (CPU): calibration, layer errors, caches, the CLI."""

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from quantgate.cases import Selection, make_case
from quantgate.cli import main
from quantgate.models import get_model
from quantgate.models.sources import SourceContext
from quantgate.pipeline import load_pipeline
from quantgate.prompts import PromptSet
from quantgate.quant import w4a8_model
from quantgate.quant.calibration import CalibrationSettings, select_linears
from quantgate.quant.gptq import GPTQConfig, gptq_quantize, hessian_error, rtn_quantize
from quantgate.quant.int4 import GroupSpec
from quantgate.quant.w4a8 import W4A8Linear
from quantgate.quant.w4a8_model import BLOCK_LINEARS, calibrate, calibration_passes, hessian_cache_refusal

REPO = Path(__file__).resolve().parents[2]
PROMPTS = PromptSet.load(REPO / "fixtures" / "prompts" / "calibration.txt").prompts
FEW_STEPS = {"num_inference_steps": 4}  # calibration over a short trajectory keeps the CPU tests fast


def _settings(seed: int = 0) -> CalibrationSettings:
    return CalibrationSettings(PROMPTS, samples=2, cpu_samples=2, seed=seed, call_kwargs=FEW_STEPS)


@pytest.fixture
def cache(tmp_path: Path, tiny_sd3_dir: Path, tiny_cache: Path) -> Path:
    """A fresh quantgate cache that shares the session's tiny weights (no calibration or checkpoints yet)."""
    (tmp_path / "synthetic").symlink_to(tiny_cache / "synthetic")
    return tmp_path


def _load(scheme: str, cache: Path, settings: CalibrationSettings | None = None):
    spec = get_model("sd35-medium")
    case = make_case(spec, "tiny", scheme, "eager", 1, "cpu", Selection(models=[spec.name], schemes=[scheme]))
    return case, load_pipeline(case, SourceContext(cache_dir=cache), settings or _settings())


def test_gptq_beats_round_to_nearest_layer_by_layer_on_the_calibration_inputs(cache):
    """||WX - QX|| over the calibration inputs X of every block linear: GPTQ below RTN, for several seeds.

    With H = 2 X Xᵀ / n (what calibration accumulates), ||WX - QX||² = n/2 · tr(ΔW H ΔWᵀ).
    """
    _, loaded = _load("bf16", cache)
    denoiser = loaded.denoiser
    layers = select_linears(denoiser, BLOCK_LINEARS)
    assert len(layers) == 29 and "transformer_blocks.0.norm1.linear" in layers and "proj_out" not in layers
    for seed in range(3):
        settings = _settings(seed).for_device("cpu", make_case(loaded.spec, "tiny", "bf16", "eager", 1, "cpu",
                                                               Selection(["sd35-medium"], ["bf16"])).call_kwargs())
        hessians, facts = calibrate(loaded.pipe, denoiser, layers, settings, {"seed": seed}, cache_dir=None)
        assert facts["cache"] == "off" and facts["samples"] == 2
        for spec in (GroupSpec(4, None, False), GroupSpec(4, None, True)):
            for name, linear in layers.items():
                w, h = linear.weight.float(), hessians[name]
                gptq = hessian_error(w, gptq_quantize(w, h, GPTQConfig(spec=spec)).dequantize(), h)
                rtn = hessian_error(w, rtn_quantize(w, spec).dequantize(), h)
                assert gptq < rtn, f"seed {seed}, {spec}, {name}: GPTQ {gptq:.4g} vs RTN {rtn:.4g}"


def test_the_pipeline_runs_with_the_gptq_transformer_and_a_second_load_uses_the_checkpoint(cache):
    case, first = _load("gptq-w4a8", cache)
    denoiser = first.denoiser
    quantized = {n for n, m in denoiser.named_modules() if isinstance(m, W4A8Linear)}
    dense = {n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(quantized) == 29 and all(n.startswith("transformer_blocks.") for n in quantized)
    assert {"context_embedder", "proj_out", "norm_out.linear"} <= dense  # embedders and final layers stay bf16
    notes = first.notes["transformer"]
    assert notes["checkpoint"] == "miss" and notes["calibration"]["cache"] == "miss"
    assert notes["calibration"]["samples"] == 2 and notes["quantize_seconds"] > 0
    assert notes["paths"]["dequant_on_cuda_per_image"]["layers"] == 4  # norm1(_context).linear of 2 blocks
    assert first.denoiser_reference_bytes / first.denoiser_footprint.total_bytes > 1.8

    images = first.generate(case, ["a lighthouse at dusk"], seed=0)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    inputs = first.denoiser_inputs(case, seed=0)
    out = first.denoiser_forward(inputs)
    buffers = {n: b.clone() for n, b in denoiser.named_buffers() if ".attn" in n or ".ff" in n}
    first.pipe = None

    _, second = _load("gptq-w4a8", cache)
    assert second.notes["transformer"]["checkpoint"] == "hit"
    assert all(torch.equal(b, dict(second.denoiser.named_buffers())[n]) for n, b in buffers.items())
    assert torch.equal(second.denoiser_forward(inputs), out)


def test_a_damaged_checkpoint_is_rebuilt(cache):
    _, first = _load("rtn-w4a8", cache)
    path = Path(first.notes["transformer"]["checkpoint_path"])
    (path / "quantized.safetensors").write_bytes(b"truncated")
    _, second = _load("rtn-w4a8", cache)
    notes = second.notes["transformer"]
    assert notes["checkpoint"] == "miss" and "checkpoint_damaged" in notes
    _, third = _load("rtn-w4a8", cache)
    assert third.notes["transformer"]["checkpoint"] == "hit"


def test_rtn_needs_no_calibration_and_shares_the_layout(cache):
    _, loaded = _load("rtn-w4a8", cache)
    notes = loaded.notes["transformer"]
    assert notes["calibration"] is None and notes["method"]["method"] == "rtn"
    assert sum(isinstance(m, W4A8Linear) for m in loaded.denoiser.modules()) == 29


def test_calibration_splits_into_passes_that_fit_the_budget():
    layers = {f"l{i}": torch.nn.Linear(64, 8) for i in range(5)}  # 16 KiB of fp32 Hessian each
    assert [len(p) for p in calibration_passes(layers, None)] == [5]
    assert [len(p) for p in calibration_passes(layers, 2 * 64 * 64 * 4)] == [2, 2, 1]
    assert [len(p) for p in calibration_passes(layers, 1)] == [1] * 5  # a layer larger than the budget goes alone


def test_gptq_quantizes_pass_by_pass_holding_one_pass_of_hessians_with_the_same_result(cache, tmp_path,
                                                                                      monkeypatch):
    """FLUX.1's Hessians (75 GB) do not fit beside the model: each pass is quantized as soon as it is
    collected and its Hessians dropped. Split into passes or not, the layers come out the same."""
    _, whole = _load("gptq-w4a8", cache)
    notes = whole.notes["transformer"]["calibration"]
    assert len(notes["passes"]) == 1
    total = notes["hessian_bytes_held_max"]
    reference = {n: b.clone() for n, b in whole.denoiser.named_buffers() if n.startswith("transformer_blocks.")}
    whole.pipe = None

    split_cache = tmp_path / "split"
    split_cache.mkdir()
    (split_cache / "synthetic").symlink_to(cache / "synthetic", target_is_directory=True)
    monkeypatch.setattr(w4a8_model, "hessian_budget", lambda device: total // 4)
    earlier: list[weakref.ref] = []  # every Hessian collected so far
    alive_at_start: list[int] = []  # how many of them were still alive when the next pass began
    real_collect = w4a8_model.collect_cached

    def collect_cached(*args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in earlier))
        stats, facts = real_collect(*args, **kwargs)
        earlier.extend(weakref.ref(s["hessian"]) for s in stats.values())
        return stats, facts

    monkeypatch.setattr(w4a8_model, "collect_cached", collect_cached)
    _, split = _load("gptq-w4a8", split_cache)
    notes = split.notes["transformer"]["calibration"]
    assert len(notes["passes"]) >= 4 and notes["hessian_bytes_held_max"] <= total // 4
    assert len(alive_at_start) == len(notes["passes"]) and set(alive_at_start) == {0}, alive_at_start
    buffers = dict(split.denoiser.named_buffers())
    assert reference and all(torch.equal(b, buffers[n]) for n, b in reference.items())


def test_hessians_too_large_for_the_disk_are_not_cached(cache, monkeypatch):
    layers = {f"l{i}": torch.nn.Linear(64, 8) for i in range(5)}  # 80 KiB of Hessians
    assert hessian_cache_refusal(layers, cache) is None
    assert hessian_cache_refusal(layers, None) is None
    why = hessian_cache_refusal(layers, cache / "not" / "yet", fraction=1e-12)  # the nearest existing parent
    assert why.startswith("Hessians not cached: 0.0 GB would exceed 0% of the") and str(cache) in why
    monkeypatch.setattr(w4a8_model, "hessian_cache_refusal", lambda layers, cache_dir: "Hessians not cached: test")
    _, loaded = _load("gptq-w4a8", cache)
    calibration = loaded.notes["transformer"]["calibration"]
    assert calibration["hessian_cache"] == "Hessians not cached: test" and calibration["cache"] == "off"
    assert not (cache / "calibration").exists() and loaded.notes["transformer"]["checkpoint"] == "miss"


def test_the_cli_steps_reuse_each_other_s_caches(cache, capsys, tmp_path):
    common = ["sd35-medium", "--source", "tiny", "--device", "cpu", "--cache-dir", str(cache), "--samples", "2",
              "--steps", "4", "--calibration-prompts", str(REPO / "fixtures" / "prompts" / "calibration.txt")]
    assert main(["gptq", "calibrate", *common]) == 0
    out = capsys.readouterr().out
    assert "calibrated 29 linears of sd35-medium (tiny) on 2 samples x 4 steps" in out and "(cache miss)" in out

    assert main(["gptq", "quantize", *common, "--scheme", "gptq-w4a8"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint miss" in out and "(cache hit)" in out  # the calibrate step's Hessians were reused
    assert main(["gptq", "quantize", *common]) == 0
    assert "checkpoint hit" in capsys.readouterr().out

    grid = tmp_path / "grid.png"
    assert main(["gptq", "samples", *common, "--schemes", "bf16,gptq-w4a8", "--count", "2",
                 "--prompts", str(REPO / "fixtures" / "prompts" / "gate.txt"), "-o", str(grid)]) == 0
    from PIL import Image

    assert Image.open(grid).size[0] > 2 * 256  # two columns of 256 px cells

    assert main(["gptq", "benchmark", *common, "--dry-run", "--benchmark-json", "out.json",
                 "--pytest-args", "-k footprint"]) == 0
    command = capsys.readouterr().out.splitlines()[-1]
    for part in ("-m pytest tests", "--quantgate-schemes bf16,bnb-nf4,rtn-w4a8,gptq-w4a8", "-m cpu",
                 "--quantgate-calibration-samples 2", "--quantgate-steps 4", "--benchmark-json out.json",
                 f"--quantgate-cache-dir {cache}", "-k footprint"):
        assert part in command


def test_the_cli_refuses_a_scheme_outside_the_plan(cache, capsys):
    assert main(["gptq", "quantize", "sd35-medium", "--source", "tiny", "--device", "cpu", "--cache-dir", str(cache),
                 "--scheme", "int8-wo"]) == 2
    assert "not a W4A8 scheme" in capsys.readouterr().err


@pytest.mark.parametrize("step", ["calibrate", "quantize", "benchmark", "samples"])
def test_every_step_has_help(step, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["gptq", step, "--help"])
    assert exc.value.code == 0 and "--samples" in capsys.readouterr().out
