"""The scheme registry: declared requirements turn into precise skip reasons."""

import pytest

from quantgate.errors import UnknownNameError
from quantgate.hardware import DeviceInfo
from quantgate.schemes import SCHEMES, get_scheme, scheme_markers
from quantgate.schemes.base import Requirements

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
RTX4090 = DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", (8, 9), 24 * 2**30)
CPU = DeviceInfo("cpu", "x86_64")


def test_registry_holds_the_core_schemes():
    assert {"bf16", "bnb-nf4", "int8-wo", "int8-dq"} <= set(SCHEMES)
    assert {"bnb", "torchao"} <= scheme_markers()


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


def test_torchao_schemes_build_diffusers_configs_for_the_denoiser_only():
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    for name, ao_class in [("int8-wo", Int8WeightOnlyConfig), ("int8-dq", Int8DynamicActivationInt8WeightConfig)]:
        config = get_scheme(name).quantization_config(("transformer",))
        assert isinstance(config, PipelineQuantizationConfig)
        assert set(config.quant_mapping) == {"transformer"}
        assert isinstance(config.quant_mapping["transformer"], TorchAoConfig)
        assert isinstance(config.quant_mapping["transformer"].quant_type, ao_class)


def test_nf4_builds_diffusers_bitsandbytes_config():
    import torch
    from diffusers import BitsAndBytesConfig

    bnb = get_scheme("bnb-nf4").quantization_config(("transformer",)).quant_mapping["transformer"]
    assert isinstance(bnb, BitsAndBytesConfig)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert not bnb.bnb_4bit_use_double_quant


def test_the_baseline_has_no_quantization_config():
    assert get_scheme("bf16").quantization_config(("transformer",)) is None
    assert get_scheme("bf16").describe()["backend"] == "none"
