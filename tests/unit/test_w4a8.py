"""The W4A8 linear layer (quantgate.quant.w4a8): packing, its three forward paths, checkpoints."""

import json

import pytest
import torch

from quantgate.measure.footprint import module_footprint
from quantgate.quant.gptq import rtn_quantize
from quantgate.quant.int4 import GroupSpec, unpack_int4
from quantgate.quant.sparse24 import quantize_rows
from quantgate.quant.w4a8 import W4A8Linear, load_layers, path_counts, read_config, save_layers

SPECS = [GroupSpec(4, None, False), GroupSpec(4, None, True), GroupSpec(4, 16, False), GroupSpec(4, 32, True)]
IDS = ["channel-asym", "channel-sym", "g16-asym", "g32-sym"]


def _layer(spec: GroupSpec, seed: int = 0, out_features: int = 24, in_features: int = 64, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    result = rtn_quantize(linear.weight, spec)
    layer = W4A8Linear.from_quantized(result.q, result.scale, result.zero, linear.bias)
    return linear, result, layer


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_packing_round_trips_the_quantized_weight(spec):
    _, result, layer = _layer(spec)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (24, 32)
    codes = unpack_int4(layer.qweight, signed=False)
    assert torch.equal(codes.to(torch.int16) - (8 if spec.symmetric else 0), result.q.to(torch.int16))
    assert torch.equal(layer.dequantized_weight(), result.dequantize())
    assert layer.int_weight().dtype == torch.int8 and int(layer.int_weight().abs().max()) <= 15


def test_values_outside_four_bits_are_refused():
    with pytest.raises(ValueError, match="outside"):
        W4A8Linear.from_quantized(torch.full((2, 4), 9, dtype=torch.int8), torch.ones(2, 1), None, None)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_the_cpu_forward_is_the_w4a8_function(spec):
    """Per-token int8 activations times the dequantized 4-bit weight, plus bias, in float32."""
    _, _, layer = _layer(spec)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    q_x, scale = quantize_rows(x.reshape(-1, 64))
    expected = (q_x.float() * scale) @ layer.dequantized_weight().t() + layer.bias.float()
    out = layer(x)
    assert out.shape == (3, 5, 24) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.reshape(3, 5, 24).bfloat16().float())
    assert layer.path_calls == {"simulated": 1}


@pytest.mark.parametrize("spec", SPECS[:2], ids=IDS[:2])
def test_the_int8_gemm_path_computes_the_same_function(spec):
    """torch._int_mm (CPU here, cuBLASLt on a GPU) on the expanded int8 weight equals the float reference."""
    _, _, layer = _layer(spec)
    rows = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    torch.testing.assert_close(layer.forward_int8(rows), layer.forward_simulated(rows), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.forward_dequant(rows).float(), layer.forward_simulated(rows),
                               rtol=0.02, atol=0.05)  # bf16 GEMM


def test_the_int8_gemm_path_refuses_grouped_scales():
    _, _, layer = _layer(GroupSpec(4, 16, False))
    with pytest.raises(ValueError, match="one scale per output channel"):
        layer.forward_int8(torch.randn(32, 64))


def test_paths_on_a_gpu_follow_rows_and_groups():
    cuda = torch.device("cuda")  # path() only reads the device type: decidable without a GPU
    _, _, channel = _layer(GroupSpec(4, None, False))
    _, _, grouped = _layer(GroupSpec(4, 16, False))
    assert channel.path(17, cuda) == "int8_gemm"
    assert channel.path(16, cuda) == "dequant"  # torch._int_mm needs more than 16 rows
    assert grouped.path(4096, cuda) == "dequant"
    assert channel.path(4096, torch.device("cpu")) == "simulated"


def test_path_counts_sum_over_a_model():
    spec = GroupSpec(4, None, False)
    model = torch.nn.Sequential(_layer(spec, out_features=32)[2], torch.nn.ReLU(),
                                _layer(spec, out_features=8, in_features=32)[2])
    x = torch.randn(2, 64).bfloat16()
    model(x)
    model(x)
    assert path_counts(model) == {"simulated": 4}


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_the_footprint_counts_packed_weights_scales_and_zeros(spec):
    _, _, layer = _layer(spec)
    groups = 64 // (spec.group_size or 64)
    expected = 24 * 32 + 24 * groups * 4 + (0 if spec.symmetric else 24 * groups) + 24 * 2  # + bf16 bias
    assert module_footprint(layer).total_bytes == expected


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_a_saved_checkpoint_reloads_bit_exactly(tmp_path, spec):
    layers = {"blocks.0.ff": _layer(spec, seed=3)[2], "blocks.0.attn.to_q": _layer(spec, seed=4, bias=False)[2]}
    save_layers(tmp_path, layers, {"method": {"method": "rtn"}})
    loaded, config = load_layers(tmp_path)
    assert config["method"] == {"method": "rtn"} and set(config["layers"]) == set(layers)
    x = torch.randn(7, 64).bfloat16()
    for name, layer in layers.items():
        again = loaded[name]
        for buffer in ("qweight", "scale", "zero", "bias"):
            a, b = getattr(layer, buffer), getattr(again, buffer)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, buffer)
        assert torch.equal(layer(x), again(x))


def test_a_foreign_directory_is_not_a_checkpoint(tmp_path):
    assert read_config(tmp_path) is None
    (tmp_path / "quantgate-w4a8.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    assert read_config(tmp_path) is None
    with pytest.raises(ValueError, match="holds no quantgate-w4a8"):
        load_layers(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares torch._int_mm on CUDA with the float "
                                                          "reference: needs a CUDA GPU")
def test_the_cuda_int8_gemm_matches_the_reference():
    _, _, layer = _layer(GroupSpec(4, None, False), out_features=256, in_features=512)
    layer = layer.cuda()
    x = torch.randn(4, 77, 512, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert layer.path_calls == {"int8_gemm": 1}
    expected = layer.forward_simulated(x.reshape(-1, 512)).reshape(4, 77, 256)
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0.01, atol=0.01)
    layer(x[:1, :16])  # 16 rows: torch._int_mm refuses them
    assert layer.path_calls == {"int8_gemm": 1, "dequant": 1}
