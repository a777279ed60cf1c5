"""Offload variants: registered, GPU-only with a reason, loaded on the CPU, diffusers' public calls."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from quantgate import offload, variants
from quantgate.cases import Selection, make_case
from quantgate.models import get_model
from quantgate.models.sources import SourceContext
from quantgate.pipeline import load_pipeline
from quantgate.variants import Variant, get_variant
from tests.conftest import REPO

OFFLOADS = ("model-offload", "sequential-offload", "group-offload", "encoder-offload")


@pytest.mark.parametrize("name", OFFLOADS)
def test_offload_variants_run_only_on_cuda_and_say_why(name):
    variant = get_variant(name)
    assert variant.loads_on_cpu and variant.prepare is not None
    assert variant.unmet("cuda") is None and variant.unmet("cuda:1") is None
    assert variant.unmet("cpu") == (f"variant {name} runs only on cuda: diffusers' offload hooks move modules "
                                    f"between the CPU and an accelerator")
    assert get_variant("eager").unmet("cpu") is None and get_variant("compile").unmet("cuda") is None


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_each_variant_makes_the_diffusers_call_and_its_arguments_fit_diffusers_signature():
    from diffusers import FluxPipeline

    for prepare, method in ((offload.model_offload, "enable_model_cpu_offload"),
                            (offload.sequential_offload, "enable_sequential_cpu_offload"),
                            (offload.group_offload, "enable_group_offload")):
        pipe = _Recorder()
        facts = prepare(pipe, "cuda")
        [(called, args, kwargs)] = pipe.calls
        assert called == method and facts["offload_call"] == method
        # The same arguments bind to the installed diffusers' method: an API change fails here.
        inspect.signature(getattr(FluxPipeline, method)).bind(None, *args, **kwargs)
    assert kwargs["onload_device"] == torch.device("cuda") and kwargs["offload_device"] == torch.device("cpu")


def test_a_variant_that_loads_on_the_cpu_gets_no_device_map_and_prepares_the_pipeline(tiny_cache, monkeypatch):
    seen = {}

    def prepare(pipe, device):
        seen["device"] = device
        seen["devices"] = {p.device.type for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                           for p in m.parameters()}
        seen["device_map"] = pipe.hf_device_map
        return {"offload": "recorded"}

    monkeypatch.setitem(variants.VARIANTS, "test-offload",
                        Variant("test-offload", "records", lambda d: {}, prepare=prepare, loads_on_cpu=True))
    spec = get_model("flux-schnell")
    case = make_case(spec, "tiny", "bf16", "test-offload", 1, "cpu", Selection(models=[spec.name], schemes=["bf16"]))
    loaded = load_pipeline(case, SourceContext(cache_dir=tiny_cache))
    assert seen == {"device": "cpu", "devices": {"cpu"}, "device_map": None}
    assert loaded.notes["offload"] == "recorded"
    selection = Selection(models=[spec.name], schemes=["bf16"])
    eager = load_pipeline(make_case(spec, "tiny", "bf16", "eager", 1, "cpu", selection),
                          SourceContext(cache_dir=tiny_cache))
    assert eager.pipe.hf_device_map == "cpu"  # everything else still loads with device_map=case.device

    # A scheme that quantizes after loading (offline) loads on the device; offload comes after it.
    from dataclasses import replace

    from quantgate.schemes import SCHEMES

    monkeypatch.setitem(SCHEMES, "bf16", replace(SCHEMES["bf16"], offline_quantization="test"))
    load_pipeline(case, SourceContext(cache_dir=tiny_cache))
    assert seen["device_map"] == "cpu"


def test_offload_variants_are_not_generated_on_the_cpu_tier_and_say_why(pytester, tiny_cache):
    pytester.makepyfile("def test_e2e(case, pipeline):\n    assert pipeline\n")
    result = pytester.runpytest("-p", "quantgate.plugin", "-p", "no:cacheprovider",
                                f"--quantgate-cache-dir={tiny_cache}",
                                f"--quantgate-gates={REPO / 'fixtures' / 'gates'}", "-m", "cpu", "-rs",
                                "--quantgate-models=flux-schnell", "--quantgate-schemes=bf16",
                                "--quantgate-variants=model-offload")
    result.assert_outcomes()
    result.stdout.fnmatch_lines(["*1  variant model-offload runs only on cuda"])


def _on_cpu(variant: Variant) -> Variant:
    from dataclasses import replace

    return replace(variant, devices=frozenset({"cpu", "cuda"}))  # the same steps, with the CPU as "device"


def test_encoder_offload_streams_the_text_encoders_and_leaves_the_image_unchanged(tiny_cache, monkeypatch):
    monkeypatch.setitem(variants.VARIANTS, "encoder-offload", _on_cpu(get_variant("encoder-offload")))
    spec = get_model("flux-schnell")
    selection = Selection(models=[spec.name], schemes=["bf16"])
    ctx = SourceContext(cache_dir=tiny_cache)
    offloaded = load_pipeline(make_case(spec, "tiny", "bf16", "encoder-offload", 1, "cpu", selection), ctx)
    eager_case = make_case(spec, "tiny", "bf16", "eager", 1, "cpu", selection)
    eager = load_pipeline(eager_case, ctx)

    assert offloaded.notes["offloaded_components"] == ["text_encoder", "text_encoder_2"]
    assert offloaded.notes["offload_call"] == "diffusers.hooks.apply_group_offloading"
    assert offloaded.notes["offload_options"] == {"offload_type": "leaf_level", "use_stream": False}  # no stream on CPU
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    pipe = offloaded.pipe
    assert all(_get_top_level_group_offload_hook(m) is not None for m in (pipe.text_encoder, pipe.text_encoder_2))
    assert all(_get_top_level_group_offload_hook(m) is None for m in (pipe.transformer, pipe.vae))
    assert pipe._execution_device == torch.device("cpu")  # from the hooks: latents are made there
    np.testing.assert_array_equal(offloaded.generate(eager_case, ["a red cube"], seed=0),
                                  eager.generate(eager_case, ["a red cube"], seed=0))


def test_encoder_offload_loads_the_denoiser_on_the_device_with_its_scheme_and_the_rest_on_the_cpu(
        tiny_cache, monkeypatch):
    import quantgate.pipeline as pipeline_module

    loaded_with = {}
    real = pipeline_module._load_denoiser_on_device

    def spy(spec, source, config, device):
        loaded_with.update(config=config, device=device)
        return real(spec, source, config, device)

    monkeypatch.setattr(pipeline_module, "_load_denoiser_on_device", spy)
    monkeypatch.setitem(variants.VARIANTS, "encoder-offload", _on_cpu(get_variant("encoder-offload")))
    spec = get_model("flux-schnell")
    case = make_case(spec, "tiny", "int8-wo", "encoder-offload", 1, "cpu",
                     Selection(models=[spec.name], schemes=["int8-wo"]))
    loaded = load_pipeline(case, SourceContext(cache_dir=tiny_cache))
    assert loaded_with["device"] == "cpu"
    assert set(loaded_with["config"].quant_mapping) == {"transformer"}
    assert loaded.denoiser_footprint.by_dtype.get("int8", 0) > 0  # quantized by the scheme's own config
    assert loaded.pipe.hf_device_map is None  # the rest loaded without a device map


def test_component_quantization_reads_the_mapping_and_refuses_the_backend_form():
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

    from quantgate.errors import PipelineBuildError
    from quantgate.pipeline import component_quantization

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    config = PipelineQuantizationConfig(quant_mapping={"transformer": nf4})
    assert component_quantization(config, "transformer") is nf4
    assert component_quantization(config, "vae") is None
    assert component_quantization(None, "transformer") is None
    backend_form = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True},
                                              components_to_quantize=["transformer"])
    with pytest.raises(PipelineBuildError, match="without quant_mapping"):
        component_quantization(backend_form, "transformer")


def test_encoder_offload_refuses_a_pipeline_without_a_text_encoder():
    class Pipe:
        components = {"transformer": torch.nn.Linear(2, 2)}

    with pytest.raises(ValueError, match="no transformers text encoder"):
        offload.encoder_offload(Pipe(), "cpu")
