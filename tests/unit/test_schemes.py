"""The scheme registry: declared requirements turn into precise skip reasons."""

import pytest

from quantgate.errors import UnknownNameError
from quantgate.hardware import DeviceInfo
from quantgate.models import get_model
from quantgate.schemes import SCHEMES, get_scheme, scheme_markers
from quantgate.schemes.base import QuantizationRequest, Requirements

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
RTX4090 = DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", (8, 9), 24 * 2**30)
CPU = DeviceInfo("cpu", "x86_64")


def test_registry_holds_the_core_schemes():
    assert {"bf16", "bnb-nf4", "int8-wo", "int8-dq", "fp8-row", "fp8-tensor", "int4-wo",
            "sparse24-int8-dq"} <= set(SCHEMES)
    assert {"bnb", "torchao", "sparse"} <= scheme_markers()


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown scheme 'fp3'; valid schemes: .*bf16.*bnb-nf4"):
        get_scheme("fp3")


def test_nf4_is_gpu_only_and_says_why():
    reason = get_scheme("bnb-nf4").requires.unmet("bnb-nf4", CPU)
    assert reason == ("bnb-nf4 runs only on a CUDA GPU (diffusers' bitsandbytes quantizer refuses to load "
                      "without a GPU); the device here is cpu")
    assert get_scheme("bnb-nf4").requires.unmet("bnb-nf4", H100) is None


@pytest.mark.parametrize("name", ["bf16", "int8-wo", "int8-dq"])
def test_cpu_capable_schemes_run_on_cpu(name):
    assert get_scheme(name).requires.unmet(name, CPU) is None


def test_a_missing_package_is_named_with_the_install_command():
    req = Requirements(packages={"quantgate-no-such-dist": ">=1.0"})
    assert req.unmet("x", CPU) == ("x needs quantgate-no-such-dist>=1.0, which is not installed: "
                                   "pip install 'quantgate-no-such-dist>=1.0'")


def test_a_too_old_package_names_the_found_version():
    import torch

    req = Requirements(packages={"torch": ">=999"})
    assert req.unmet("x", CPU) == f"x needs torch>=999, found torch {torch.__version__}: pip install -U 'torch>=999'"


def test_compute_capability_bounds_name_the_gpu_and_the_reason():
    req = Requirements(devices=frozenset({"cuda"}), min_capability=(7, 5), max_capability=(8, 9),
                       capability_note="sm_90 has no INT4 tensor cores")
    assert req.unmet("svdq-int4", RTX4090) is None
    assert req.unmet("svdq-int4", H100) == ("svdq-int4 needs compute capability sm_75–sm_89; NVIDIA H100 80GB HBM3 "
                                            "is sm_90 (sm_90 has no INT4 tensor cores)")


def _request(model="flux-schnell"):
    return QuantizationRequest(get_model(model), ("transformer",))


@pytest.mark.parametrize(("name", "ao_class", "granularity"), [
    ("int8-wo", "Int8WeightOnlyConfig", None),
    ("fp8-row", "Float8DynamicActivationFloat8WeightConfig", "PerRow"),
    ("fp8-tensor", "Float8DynamicActivationFloat8WeightConfig", "PerTensor"),
    ("int4-wo", "Int4WeightOnlyConfig", None),
])
def test_torchao_schemes_build_diffusers_configs_for_the_denoiser_only(name, ao_class, granularity):
    from diffusers import PipelineQuantizationConfig, TorchAoConfig

    plan = get_scheme(name).plan(_request())
    assert isinstance(plan.config, PipelineQuantizationConfig)
    assert set(plan.config.quant_mapping) == {"transformer"}
    ao = plan.config.quant_mapping["transformer"]
    assert isinstance(ao, TorchAoConfig) and type(ao.quant_type).__name__ == ao_class
    if granularity:
        found = ao.quant_type.granularity  # torchao normalizes to [activation, weight]
        assert {type(g).__name__ for g in (found if isinstance(found, list) else [found])} == {granularity}


def test_int4_uses_the_packing_that_needs_no_extra_kernels():
    ao = get_scheme("int4-wo").plan(_request()).config.quant_mapping["transformer"].quant_type
    assert ao.int4_packing_format == "tile_packed_to_4d" and ao.group_size == 128
    assert "tile_packed_to_4d" in get_scheme("int4-wo").describe()["config"]


@pytest.mark.parametrize("model", ["flux-schnell", "sd35-medium"])
def test_int8_dq_serves_per_image_linears_with_weight_only_int8(model):
    import re

    import torch

    plan = get_scheme("int8-dq").plan(_request(model))
    fqn = plan.config.quant_mapping["transformer"].quant_type
    pattern, per_image = next(iter(fqn.fqn_to_config.items()))
    assert type(per_image).__name__ == "Int8WeightOnlyConfig"
    assert type(fqn.fqn_to_config["_default"]).__name__ == "Int8DynamicActivationInt8WeightConfig"
    assert "one row per image" in plan.notes["per_image_linears"]["why"]
    comp = get_model(model).component("transformer")
    with torch.device("meta"):
        module = comp.load_class().from_config(comp.config_for("full"))
    linears = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in linears if re.fullmatch(pattern.removeprefix("re:"), n)]
    # every adaLN modulation and the timestep/text embedders, and nothing that sees tokens
    assert all(".norm" in n or n.startswith(("time_text_embed.", "norm_out.")) for n in matched)
    assert not any(n.endswith(("to_q", "to_k", "ff.net.2", "proj_mlp", "context_embedder")) for n in matched)
    expected_blocks = 2 * comp.config_for("full")["num_layers"] + comp.config_for("full").get("num_single_layers", 0)
    assert sum(".norm" in n and "blocks." in n for n in matched) == expected_blocks


def test_gpu_only_schemes_name_their_hardware_needs():
    ampere = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), 80 * 2**30)
    assert "FP8 tensor cores start with Ada, sm_89" in get_scheme("fp8-row").requires.unmet("fp8-row", ampere)
    assert get_scheme("fp8-row").requires.unmet("fp8-row", H100) is None
    assert get_scheme("int4-wo").requires.unmet("int4-wo", ampere) is None
    assert "sm_80" in get_scheme("sparse24-int8-dq").requires.unmet("sparse24-int8-dq",
                                                                     DeviceInfo("cuda", "T4", (7, 5), 16 * 2**30))


def test_nf4_builds_diffusers_bitsandbytes_config():
    import torch
    from diffusers import BitsAndBytesConfig

    bnb = get_scheme("bnb-nf4").plan(_request()).config.quant_mapping["transformer"]
    assert isinstance(bnb, BitsAndBytesConfig)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert not bnb.bnb_4bit_use_double_quant


def test_the_baseline_has_no_quantization_config():
    assert get_scheme("bf16").plan(_request()).config is None
    assert get_scheme("bf16").describe()["backend"] == "none"
