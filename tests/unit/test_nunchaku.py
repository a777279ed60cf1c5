"""The nunchaku schemes without the engine: naming, checkpoint discovery, hardware gating,
loading through a stand-in engine, LoRA files, the low-rank switch and the first-block cache."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from quantgate.errors import SourceUnavailable
from quantgate.hardware import DeviceInfo
from quantgate.models import get_model
from quantgate.nunchaku_lora import (
    COMPOSED_RANK_WARNING,
    LoraFile,
    apply_loras,
    flux_lora_targets,
    inspect_lora,
    plan_loras,
    reset_loras,
    set_strength,
    write_synthetic_lora,
)
from quantgate.quant.lowrank import without_low_rank
from quantgate.schemes import get_scheme
from quantgate.schemes import nunchaku as nk
from quantgate.schemes.base import QuantizationRequest

FLUX = get_model("flux-schnell")
DEVICES = {
    "T4": DeviceInfo("cuda", "Tesla T4", (7, 5)),
    "A100": DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0)),
    "RTX 3090": DeviceInfo("cuda", "NVIDIA GeForce RTX 3090", (8, 6)),
    "Orin": DeviceInfo("cuda", "Orin", (8, 7)),
    "RTX 4090": DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", (8, 9)),
    "H200": DeviceInfo("cuda", "NVIDIA H200", (9, 0)),
    "B200": DeviceInfo("cuda", "NVIDIA B200", (10, 0)),
    "RTX 5090": DeviceInfo("cuda", "NVIDIA GeForce RTX 5090", (12, 0)),
    "DGX Spark": DeviceInfo("cuda", "NVIDIA GB10", (12, 1)),
}


def _write(path: Path, quantization_config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"quantization_config": json.dumps(quantization_config)} if quantization_config else None
    save_file({"x": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def _hub_file(cache: Path, org: str, filename: str, revision: str = "abc123", main: bool = True) -> Path:
    """Lay a file out as huggingface_hub does: a snapshot symlink into blobs/, refs/main."""
    repo = cache / f"models--{org}--nunchaku-flux.1-schnell"
    blob = _write(repo / "blobs" / f"{filename}.blob")
    link = repo / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return link


# -- naming -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("svdq-int4_r32-flux.1-schnell.safetensors", ("int4", 32, "flux.1-schnell")),
    ("svdq-fp4_r32-flux.1-dev.safetensors", ("nvfp4", 32, "flux.1-dev")),
    ("svdq-int4_r128-flux.1-kontext-dev.safetensors", ("int4", 128, "flux.1-kontext-dev")),
    ("transformer_blocks.safetensors", None),
    ("svdq-int8_r32-flux.1-dev.safetensors", None),
])
def test_checkpoint_names_give_precision_rank_and_model(name, expected):
    assert nk.parse_name(name) == expected


def test_a_file_not_named_by_convention_needs_the_overrides(tmp_path):
    path = _write(tmp_path / "my-flux.safetensors")
    with pytest.raises(ValueError, match="give its precision and rank"):
        nk.checkpoint_from_file(path)
    found = nk.checkpoint_from_file(path, "int4", 64)
    assert (found.precision, found.rank, found.inferred_from) == ("int4", 64, "override")
    named = nk.checkpoint_from_file(_write(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors"))
    assert (named.precision, named.rank, named.model, named.inferred_from) == ("int4", 32, "flux.1-dev", "file name")


def test_the_files_metadata_must_agree_with_name_and_overrides(tmp_path):
    config = {"weight": {"dtype": "fp4_e2m1_all", "group_size": 16}, "rank": 32}
    good = _write(tmp_path / "svdq-fp4_r32-flux.1-dev.safetensors", config)
    assert nk.checkpoint_from_file(good).precision == "nvfp4"
    with pytest.raises(ValueError, match="rank 32 by its metadata, not 64"):
        nk.checkpoint_from_file(good, rank=64)
    mislabelled = _write(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", config)
    with pytest.raises(ValueError, match="dtype 'fp4_e2m1_all' by its metadata, not int4"):
        nk.checkpoint_from_file(mislabelled)


# -- discovery ----------------------------------------------------------------------------------

def test_finds_the_checkpoint_in_the_hub_cache_layout(tmp_path):
    link = _hub_file(tmp_path, "nunchaku-tech", "svdq-int4_r32-flux.1-schnell.safetensors")
    _hub_file(tmp_path, "nunchaku-tech", "svdq-int4_r128-flux.1-schnell.safetensors")
    found = nk.find_checkpoint(FLUX, "int4", tmp_path)
    assert isinstance(found, nk.Checkpoint)
    assert found.path == link and found.rank == 32
    assert found.found_in == "hub cache (nunchaku-tech/nunchaku-flux.1-schnell@abc123)"
    assert nk.find_checkpoint(FLUX, "int4", tmp_path, rank=128).rank == 128
    assert "no nunchaku int4 checkpoint svdq-int4_r64" in nk.find_checkpoint(FLUX, "int4", tmp_path, rank=64)


def test_precision_picks_the_file_and_the_old_organisation_is_searched_too(tmp_path):
    _hub_file(tmp_path, "mit-han-lab", "svdq-fp4_r32-flux.1-schnell.safetensors", main=False)
    found = nk.find_checkpoint(FLUX, "nvfp4", tmp_path)
    assert found.precision == "nvfp4" and found.found_in.startswith("hub cache (mit-han-lab/nunchaku-flux.1-schnell@")
    assert isinstance(nk.find_checkpoint(FLUX, "int4", tmp_path), str)


def test_an_unfinished_download_is_not_a_checkpoint(tmp_path):
    link = _hub_file(tmp_path, "nunchaku-tech", "svdq-int4_r32-flux.1-schnell.safetensors")
    link.resolve().unlink()  # the snapshot link dangles, as while huggingface_hub downloads
    reason = nk.find_checkpoint(FLUX, "int4", tmp_path)
    assert reason.startswith("no nunchaku int4 checkpoint svdq-int4_r*-flux.1-schnell.safetensors for flux-schnell")
    assert "snapshots of nunchaku-tech/nunchaku-flux.1-schnell@abc123" in reason
    assert ("hf download nunchaku-tech/nunchaku-flux.1-schnell svdq-int4_r32-flux.1-schnell.safetensors" in reason
            and "QUANTGATE_NUNCHAKU_CHECKPOINT=FILE" in reason)


def test_a_configured_path_comes_first(tmp_path):
    _hub_file(tmp_path / "hub", "nunchaku-tech", "svdq-int4_r32-flux.1-schnell.safetensors")
    mine = _write(tmp_path / "mine" / "svdq-int4_r64-flux.1-schnell.safetensors")
    found = nk.find_checkpoint(FLUX, "int4", tmp_path / "hub", mine)
    assert found.path == mine and found.rank == 64 and found.found_in == "$QUANTGATE_NUNCHAKU_CHECKPOINT"
    assert nk.find_checkpoint(FLUX, "int4", tmp_path / "hub", mine.parent).path == mine  # a directory
    assert "is a int4 checkpoint, not nvfp4" in nk.find_checkpoint(FLUX, "nvfp4", tmp_path / "hub", mine)
    assert "does not exist" in nk.find_checkpoint(FLUX, "int4", tmp_path / "hub", tmp_path / "nowhere")
    custom = _write(tmp_path / "custom.safetensors")
    assert "give its precision and rank" in nk.find_checkpoint(FLUX, "int4", tmp_path / "hub", custom)
    assert nk.find_checkpoint(FLUX, "int4", tmp_path / "hub", custom, rank=32).inferred_from == "override"


def test_the_configured_rank_must_be_a_number(monkeypatch):
    monkeypatch.setenv(nk.ENV_RANK, "r32")
    with pytest.raises(ValueError, match="whole number"):
        nk.configured_checkpoint()


# -- hardware and engine gating -----------------------------------------------------------------

@pytest.mark.parametrize(("scheme", "runs_on"), [
    ("svdq-int4", {"T4", "A100", "RTX 3090", "RTX 4090"}),
    ("svdq-nvfp4", {"RTX 5090", "DGX Spark"}),
])
def test_each_precision_runs_only_where_nunchaku_has_kernels(scheme, runs_on, monkeypatch):
    monkeypatch.setattr(nk, "engine_problem", lambda: None)
    requires = nk.requirements(scheme.removeprefix("svdq-"))
    for name, device in DEVICES.items():
        reason = requires.unmet(scheme, device, "flux-schnell")
        assert (reason is None) == (name in runs_on), (name, reason)


def test_hopper_skips_with_the_hardware_reason_before_the_package_one():
    reason = get_scheme("svdq-int4").requires.unmet("svdq-int4", DEVICES["H200"], "flux-schnell")
    assert reason == ("svdq-int4 needs compute capability sm_75, sm_80, sm_86 or sm_89; NVIDIA H200 is sm_90 "
                      "(nunchaku's INT4 W4A4 kernels are built for Turing, Ampere and Ada only; Hopper (sm_90) has no "
                      "INT4 tensor cores and nunchaku refuses it)")
    fp4 = get_scheme("svdq-nvfp4-fbcache").requires.unmet("svdq-nvfp4-fbcache", DEVICES["B200"], "flux-dev")
    assert fp4.startswith("svdq-nvfp4-fbcache needs compute capability sm_120 or sm_121; NVIDIA B200 is sm_100")


def test_cpu_and_sd35_skip_saying_why():
    cpu = DeviceInfo("cpu", "x86_64")
    assert get_scheme("svdq-int4").requires.unmet("svdq-int4", cpu, "flux-schnell") == (
        "svdq-int4 runs only on a CUDA GPU (nunchaku's int4 W4A4 kernels are CUDA-only); the device here is cpu")
    assert get_scheme("svdq-int4").requires.unmet("svdq-int4", DEVICES["RTX 4090"], "sd35-medium") == (
        "svdq-int4 supports only flux-dev, flux-schnell, not sd35-medium (nunchaku has no SD3.5 support: no SD3 "
        "transformer class and no pre-quantized SD3.5 checkpoint)")


def test_a_missing_or_foreign_nunchaku_is_named(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(dist):
        if dist == "nunchaku":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert "not on PyPI (PyPI's 'nunchaku' is an unrelated project)" in nk.engine_problem()
    assert nk.RELEASES in nk.engine_problem()
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "0.0.3")
    assert "older than the engine's 1.0 or PyPI's unrelated 'nunchaku'" in nk.engine_problem()
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "1.0.2")
    monkeypatch.setitem(sys.modules, "nunchaku", types.ModuleType("nunchaku"))
    assert "has no NunchakuFluxTransformer2DModelV2: it is not MIT HAN Lab's engine" in nk.engine_problem()
    assert get_scheme("svdq-int4").requires.unmet("svdq-int4", DEVICES["RTX 4090"], "flux-dev") == nk.engine_problem()


# -- loading through a stand-in engine ----------------------------------------------------------

class _FakeEngine(types.ModuleType):
    """Stands in for the nunchaku package: its V2 class loads a plain diffusers transformer."""

    def __init__(self, transformer_dir: Path):
        super().__init__("nunchaku")
        self.calls: list[tuple] = []
        engine = self

        class NunchakuFluxTransformer2DModelV2:
            @classmethod
            def from_pretrained(cls, path, device, torch_dtype):
                from diffusers import FluxTransformer2DModel

                engine.calls.append((path, device, torch_dtype))
                return FluxTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch_dtype).to(device)

        self.NunchakuFluxTransformer2DModelV2 = NunchakuFluxTransformer2DModelV2


def _request(source: str) -> QuantizationRequest:
    return QuantizationRequest(FLUX, ("transformer",), identity={"model": "flux-schnell", "source": source})


def test_plan_refuses_other_weights_and_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv(nk.ENV_CHECKPOINT, raising=False)
    with pytest.raises(SourceUnavailable, match="runs only with the real pipeline .*not synthetic"):
        get_scheme("svdq-int4").plan(_request("synthetic"))
    with pytest.raises(SourceUnavailable, match="no nunchaku int4 checkpoint"):
        get_scheme("svdq-int4").plan(_request("hub"))


def test_the_checkpoint_becomes_the_pipelines_transformer(tiny_flux_dir, tiny_cache, tmp_path, monkeypatch):
    from quantgate.cases import Selection, make_case
    from quantgate.models.sources import SourceContext
    from quantgate.pipeline import load_pipeline

    checkpoint = _write(tmp_path / "svdq-int4_r32-flux.1-schnell.safetensors",
                        {"weight": {"dtype": "int4", "group_size": 64}, "rank": 32})
    monkeypatch.setenv(nk.ENV_CHECKPOINT, str(checkpoint))
    engine = _FakeEngine(tiny_flux_dir / "transformer")
    monkeypatch.setitem(sys.modules, "nunchaku", engine)
    case = make_case(FLUX, "path", "svdq-int4", "eager", 1, "cpu", Selection(["flux-schnell"], ["svdq-int4"]))
    ctx = SourceContext(cache_dir=tiny_cache, paths={"flux-schnell": tiny_flux_dir})

    loaded = load_pipeline(case, ctx)

    assert engine.calls == [(str(checkpoint), "cpu", torch.bfloat16)]
    assert loaded.notes["nunchaku"]["checkpoint"] == {
        "path": str(checkpoint), "precision": "int4", "rank": 32, "model": "flux.1-schnell",
        "found_in": "$QUANTGATE_NUNCHAKU_CHECKPOINT", "inferred_from": "file name"}
    assert loaded.pipe.transformer.dtype == torch.bfloat16
    assert loaded.describe()["scheme_info"]["backend"] == "nunchaku"


# -- LoRA files ---------------------------------------------------------------------------------

def _tiny_config() -> dict:
    return FLUX.component("transformer").config_for("tiny")


def test_synthetic_loras_are_diffusers_layout_files_of_the_given_rank(tmp_path):
    path = write_synthetic_lora(tmp_path / "a.safetensors", _tiny_config(), rank=4, seed=1)
    info = inspect_lora(path)
    config = _tiny_config()
    assert (info.layout, info.rank) == ("diffusers", 4)
    assert info.modules == len(flux_lora_targets(config)) == 8 * config["num_layers"] + 3 * config["num_single_layers"]
    from safetensors.torch import load_file

    again = load_file(write_synthetic_lora(tmp_path / "b.safetensors", config, rank=4, seed=1))
    first = load_file(path)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_lora_plans_single_and_composed_and_refuse_what_nunchaku_cannot_do(tmp_path):
    a = write_synthetic_lora(tmp_path / "a.safetensors", _tiny_config(), rank=4)
    b = write_synthetic_lora(tmp_path / "b.safetensors", _tiny_config(), rank=8, seed=1)
    assert plan_loras([LoraFile(a, 0.8)]).mode == "single"
    composed = plan_loras([LoraFile(a), LoraFile(b, 0.5)])
    assert composed.mode == "composed" and composed.composed_rank == 12 and "warning" not in composed.notes
    big = write_synthetic_lora(tmp_path / "big.safetensors", _tiny_config(), rank=COMPOSED_RANK_WARNING)
    assert "slowdown" in plan_loras([LoraFile(big), LoraFile(a)]).notes["warning"]
    converted = _write(tmp_path / "converted.safetensors")
    from safetensors.torch import save_file

    save_file({"transformer_blocks.0.mlp_fc1.lora_down": torch.zeros(4, 16)}, str(converted))
    assert inspect_lora(converted).layout == "nunchaku"
    with pytest.raises(ValueError, match="cannot be composed"):
        plan_loras([LoraFile(a), LoraFile(converted)])
    with pytest.raises(ValueError, match="holds no LoRA factors"):
        inspect_lora(_write(tmp_path / "weights.safetensors"))
    with pytest.raises(FileNotFoundError):
        plan_loras([LoraFile(tmp_path / "missing.safetensors")])
    with pytest.raises(ValueError, match="finite"):
        plan_loras([LoraFile(a, float("nan"))])


def test_lora_specs_parse_path_and_strength():
    assert LoraFile.parse("style.safetensors:0.75") == LoraFile(Path("style.safetensors"), 0.75)
    assert LoraFile.parse("/loras/style.safetensors") == LoraFile(Path("/loras/style.safetensors"), 1.0)
    assert LoraFile.parse("C:\\loras\\style.safetensors").strength == 1.0


class _RecordingTransformer:
    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_loras_go_through_nunchakus_api(tmp_path, monkeypatch):
    a = write_synthetic_lora(tmp_path / "a.safetensors", _tiny_config(), rank=4)
    b = write_synthetic_lora(tmp_path / "b.safetensors", _tiny_config(), rank=4, seed=1)
    single, t = plan_loras([LoraFile(a, 0.6)]), _RecordingTransformer()
    apply_loras(t, single)
    set_strength(t, single, 0.0)
    reset_loras(t)
    assert t.calls == [("update_lora_params", str(a)), ("set_lora_strength", 0.6), ("set_lora_strength", 0.0),
                       ("reset_lora",)]

    compose = types.ModuleType("nunchaku.lora.flux.compose")
    compose.compose_lora = lambda pairs: {"composed": pairs}
    monkeypatch.setitem(sys.modules, "nunchaku.lora.flux.compose", compose)
    composed, t = plan_loras([LoraFile(a, 1.0), LoraFile(b, 0.5)]), _RecordingTransformer()
    apply_loras(t, composed)
    assert t.calls == [("update_lora_params", {"composed": [(str(a), 1.0), (str(b), 0.5)]})]
    with pytest.raises(ValueError, match="scales every composed LoRA at once"):
        set_strength(t, composed, 0.5)


# -- the low-rank switch and the first-block cache --------------------------------------------

class SVDQW4A4Linear(nn.Module):  # the name and attributes of nunchaku's W4A4 linear
    def __init__(self):
        super().__init__()
        self.rank = 32
        self.proj_down = nn.Parameter(torch.ones(64, 32), requires_grad=False)
        self.proj_up = nn.Parameter(torch.ones(48, 32), requires_grad=False)


def test_nunchakus_branch_is_switched_off_with_zero_width_factors_and_restored():
    model = nn.Sequential(SVDQW4A4Linear(), SVDQW4A4Linear())
    down = model[0].proj_down
    with without_low_rank(model) as count:
        assert count == 2
        assert model[0].proj_down.shape == (64, 0) and model[0].proj_up.shape == (48, 0) and model[0].rank == 0
    assert model[0].proj_down is down and model[0].rank == 32


def test_first_block_cache_is_on_inside_this_pipelines_calls_only(monkeypatch):
    entered = []

    class Context:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    adapters = types.ModuleType("nunchaku.caching.diffusers_adapters.flux_v2")

    def apply_cache_on_transformer(transformer, residual_diff_threshold):
        transformer._original_forward = transformer.forward
        transformer.forward = lambda: "cached"

    adapters.apply_cache_on_transformer = apply_cache_on_transformer
    fbcache = types.ModuleType("nunchaku.caching.fbcache")
    fbcache.cache_context = lambda ctx: Context()
    fbcache.create_cache_context = lambda: None
    monkeypatch.setitem(sys.modules, "nunchaku.caching.diffusers_adapters.flux_v2", adapters)
    monkeypatch.setitem(sys.modules, "nunchaku.caching.fbcache", fbcache)

    class Transformer:
        def forward(self):
            return "plain"

    class Pipe:
        def __init__(self):
            self.transformer = Transformer()

        def __call__(self):
            return self.transformer.forward()

    pipe, other = Pipe(), Pipe()
    facts = nk.enable_first_block_cache(pipe)
    assert facts["first_block_cache"]["residual_diff_threshold"] == nk.FBCACHE_THRESHOLD
    assert pipe() == "cached" and entered == [True]
    assert pipe.transformer.forward() == "plain"  # a bare forward (transformer scope) is uncached
    assert other() == "plain" and type(other) is Pipe and isinstance(pipe, Pipe)
