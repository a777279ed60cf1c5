"""quantgate.quant.nunchaku_format: nunchaku's tile layouts (hand-worked positions), exact inverses, and
SVDQuantLinear / Int4WeightOnlyLinear round trips through nunchaku's tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantgate.quant import nunchaku_format as nf
from quantgate.quant.int4 import pack_int4
from quantgate.quant.nvfp4 import quantize_nvfp4
from quantgate.quant.svdquant import (
    GELU_SHIFT,
    Int4WeightOnlyLinear,
    SVDQuantLinear,
    fake_quantize_uint4,
    quantize_int4_weight,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- hand-worked positions, from deepcompressor's NunchakuWeightPacker reshape/permute (see module docs) ----------

# (n, k) of a code in a 128 x 128 weight -> (row, col, high nibble?) of qweight viewed (128, 64) int8.
# word = ((((nt*KT + kt)*8 + p)*8 + l)*4 + b)*4 + s*2 + a with n = 16p + 8s + l, k = 64kt + 32a + 8b + c;
# byte = 4*word + c//2, nibble c%2; row, col = divmod(byte, 64).
QWEIGHT_POSITIONS = [
    ((0, 0), (0, 0, False)),
    ((0, 1), (0, 0, True)),
    ((0, 8), (0, 16, False)),     # b=1 -> word 4
    ((0, 32), (0, 4, False)),     # a=1 -> word 1
    ((8, 0), (0, 8, False)),      # s=1 -> word 2
    ((1, 0), (1, 0, False)),      # l=1 -> word 16 -> byte 64
    ((16, 0), (8, 0, False)),     # p=1 -> word 128 -> byte 512
    ((0, 64), (64, 0, False)),    # kt=1 -> word 1024 (one 128 x 64 tile) -> byte 4096
    ((9, 3), (1, 9, True)),       # word 18, c=3 -> byte 73, high
    ((127, 127), (127, 63, True)),  # word 2047, c=7 -> byte 8191, high
]


@pytest.mark.parametrize(("nk", "where"), QWEIGHT_POSITIONS)
def test_qweight_nibble_lands_where_nunchaku_reads_it(nk, where):
    codes = torch.zeros(128, 128, dtype=torch.int8)
    codes[nk] = -3  # two's complement nibble 0xD
    packed = nf.pack_w4a4_weight(codes).view(torch.uint8)
    row, col, high = where
    expected = torch.zeros(128, 64, dtype=torch.uint8)
    expected[row, col] = 0xD0 if high else 0x0D
    assert torch.equal(packed, expected)


# wscales (N=256, K=128: G=2) viewed (2, 256): flat = (nt*G + g)*128 + 16a + 4c + 2b + d, n = 128nt + 16a + 8b + 2c + d
WSCALES_POSITIONS = [((8, 0), (0, 2)), ((2, 0), (0, 4)), ((1, 1), (0, 129)), ((128, 0), (1, 0)),
                     ((130, 1), (1, 132)), ((127, 0), (0, 127)), ((16, 0), (0, 16))]


@pytest.mark.parametrize(("ng", "where"), WSCALES_POSITIONS)
def test_wscales_position(ng, where):
    scales = torch.zeros(256, 2, dtype=torch.bfloat16)
    scales[ng] = 5.0
    packed = nf.pack_scales(scales)
    assert packed.shape == (2, 256)
    assert packed.nonzero().tolist() == [list(where)]


def test_channel_vector_position():
    # bias / smooth share the scale layout with one group: n=8 -> 2, n=2 -> 4, n=1 -> 1, n=16 -> 16, n=130 -> 132
    for n, pos in [(8, 2), (2, 4), (1, 1), (16, 16), (130, 132)]:
        v = torch.zeros(256, dtype=torch.bfloat16)
        v[n] = 1
        assert nf.pack_channels(v).nonzero().flatten().tolist() == [pos]


# NVFP4 fp8 scales (N=128, K=128: 8 blocks) viewed (8, 128): flat = (nt*KG + kg)*512 + 64b + 16a + 4s + j,
# n = 32s + 8a + b, block = 4kg + j
FP8_POSITIONS = [((32, 0), (0, 4)), ((8, 0), (0, 16)), ((1, 0), (0, 64)), ((0, 1), (0, 1)), ((0, 4), (4, 0))]


@pytest.mark.parametrize(("nb", "where"), FP8_POSITIONS)
def test_fp8_scale_position(nb, where):
    scales = torch.zeros(128, 8).to(torch.float8_e4m3fn)
    scales[nb] = 2.0
    packed = nf.pack_fp8_scales(scales)
    assert packed.shape == (8, 128) and packed.dtype == torch.float8_e4m3fn
    assert packed.float().nonzero().tolist() == [list(where)]


# low-rank 16 x 16 blocks: flat = (cp*RP + rp)*256 + 32l + 8b + 4p + 2q + e
DOWN_POSITIONS = [((1, 0), (2, 0)), ((8, 0), (0, 4)), ((0, 2), (0, 8)), ((0, 1), (0, 1)), ((0, 8), (0, 2)),
                  ((0, 16), (16, 0))]  # (rank, channel) of lora_down (16, 128) -> packed (128, 16)
UP_POSITIONS = [((1, 0), (1, 0)), ((0, 16), (8, 0)), ((16, 0), (16, 0)), ((0, 2), (0, 8))]  # lora_up (128, 32)


def test_lowrank_positions():
    for (r, c), where in DOWN_POSITIONS:
        down = torch.zeros(16, 128, dtype=torch.bfloat16)
        down[r, c] = 1
        assert nf.pack_lora_down(down).nonzero().tolist() == [list(where)], (r, c)
    for (n, r), where in UP_POSITIONS:
        up = torch.zeros(128, 32, dtype=torch.bfloat16)
        up[n, r] = 1
        assert nf.pack_lora_up(up).nonzero().tolist() == [list(where)], (n, r)


# AWQ qweight (N=4, K=64) -> int32 (1, 32): word16 col = 64(k//64) + 16(n%4) + 8((k%64)//32) + k%8,
# nibble (k%32)//8; int32 col = word16 col // 2, bit = 16*(word16 col % 2) + 4*nibble
AWQ_POSITIONS = [((0, 0), (0, 0)), ((0, 8), (0, 4)), ((0, 1), (0, 16)), ((0, 32), (4, 0)), ((2, 0), (16, 0)),
                 ((0, 24), (0, 12)), ((1, 9), (8, 20)), ((3, 63), (31, 28))]


@pytest.mark.parametrize(("nk", "where"), AWQ_POSITIONS)
def test_awq_nibble_position(nk, where):
    codes = torch.zeros(4, 64, dtype=torch.int8)
    codes[nk] = 5
    scales = torch.ones(4, 1, dtype=torch.bfloat16)
    q = nf.pack_w4a16_awq(codes, scales, torch.zeros(4, 1))["qweight"]
    assert q.shape == (1, 32) and q.dtype == torch.int32
    col, bit = where
    expected = torch.zeros(1, 32, dtype=torch.int64)
    expected[0, col] = 5 << bit
    assert torch.equal(q.to(torch.int64) & 0xFFFFFFFF, expected)


# -- exact inverses ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(128, 128), (256, 384), (384, 256)])
def test_pack_unpack_identity(n, k):
    g = _gen(n + k)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(nf.unpack_w4a4_weight(nf.pack_w4a4_weight(codes)), codes)
    e2m1 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    assert torch.equal(nf.unpack_w4a4_weight(nf.pack_w4a4_weight(e2m1), signed=False), e2m1)
    scales = torch.rand(n, k // 64, generator=g).to(torch.bfloat16)
    assert torch.equal(nf.unpack_scales(nf.pack_scales(scales)), scales)
    fp8 = (torch.rand(n, k // 16, generator=g) * 4).to(torch.float8_e4m3fn)
    assert torch.equal(nf.unpack_fp8_scales(nf.pack_fp8_scales(fp8)).view(torch.uint8), fp8.view(torch.uint8))
    vec = torch.randn(n, generator=g).to(torch.bfloat16)
    assert torch.equal(nf.unpack_channels(nf.pack_channels(vec)), vec)
    down = torch.randn(32, k, generator=g).to(torch.bfloat16)
    up = torch.randn(n, 32, generator=g).to(torch.bfloat16)
    assert nf.pack_lora_down(down).shape == (k, 32)
    assert torch.equal(nf.unpack_lora_down(nf.pack_lora_down(down)), down)
    assert torch.equal(nf.unpack_lora_up(nf.pack_lora_up(up)), up)
    awq_codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    zeros = torch.randint(0, 16, (n, k // 64), generator=g).float()
    back = nf.unpack_w4a16_awq(nf.pack_w4a16_awq(awq_codes, scales, zeros))
    assert torch.equal(back[0], awq_codes) and torch.equal(back[1], scales) and torch.equal(back[2], zeros)


def test_rank_padded_to_16():
    down = torch.randn(20, 128, generator=_gen()).to(torch.bfloat16)
    packed = nf.pack_lora_down(down)
    assert packed.shape == (128, 32)
    back = nf.unpack_lora_down(packed)
    assert torch.equal(back[:20], down) and not back[20:].any()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiples of 128, got \\(128, 96\\)"):
        nf.pack_w4a4_weight(torch.zeros(128, 96, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiples of 128"):
        nf.pack_w4a4_weight(torch.zeros(64, 128, dtype=torch.int8))
    with pytest.raises(ValueError, match="INT4 \\[-8, 7\\]"):
        nf.pack_w4a4_int4(torch.full((128, 128), 9, dtype=torch.int8), torch.ones(128, 2, dtype=torch.bfloat16),
                          torch.zeros(128), torch.ones(128), torch.zeros(16, 128), torch.zeros(128, 16))
    small = SVDQuantLinear(96, 128, 4, "int4", 32, bias=False)
    with pytest.raises(ValueError, match="group size 64"):
        nf.from_svdquant_linear(small)


# -- quantgate layers ----------------------------------------------------------------------------------------------


def _svdquant_layer(n: int, k: int, rank: int, precision: str = "int4", pow2_smooth: bool = True,
                    unsigned: bool = False, seed: int = 0) -> SVDQuantLinear:
    g = _gen(seed)
    group = 64 if precision == "int4" else 16
    layer = SVDQuantLinear(k, n, rank, precision, group, bias=True, unsigned_input=unsigned)
    residual = torch.randn(n, k, generator=g) * 0.05
    with torch.no_grad():
        if precision == "int4":
            packed, scales = quantize_int4_weight(residual, group)
            layer.qweight.copy_(packed)
            layer.wscales.copy_(scales)
        else:
            codes, block, tensor_scale = quantize_nvfp4(residual, group)
            layer.qweight.copy_(pack_int4(codes.to(torch.int8)))
            layer.wscales.copy_(block)
            layer.wtscale.copy_(tensor_scale)
        if pow2_smooth:  # x / 2^e is exact in bf16, so the lora_down rescale is too
            smooth = 2.0 ** torch.randint(-3, 4, (k,), generator=g).float()
        else:
            smooth = torch.rand(k, generator=g) * 3 + 0.2
        layer.smooth.copy_(smooth)
        layer.lora_down.copy_(torch.randn(rank, k, generator=g) * 0.1)
        layer.lora_up.copy_(torch.randn(n, rank, generator=g) * 0.1)
        layer.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return layer


def _x(k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, k, generator=_gen(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_svdquant_round_trip_identical_outputs(precision):
    layer = _svdquant_layer(256, 384, rank=20, precision=precision)
    tensors = nf.from_svdquant_linear(layer)
    assert tensors["qweight"].shape == (256, 192) and tensors["qweight"].dtype == torch.int8
    assert tensors["lora_down"].shape == (384, 32) and tensors["lora_up"].shape == (256, 32)
    assert tensors["smooth"].shape == (384,) and tensors["bias"].shape == (256,)
    if precision == "int4":
        assert tensors["wscales"].shape == (6, 256) and tensors["wscales"].dtype == torch.bfloat16
        assert "wtscale" not in tensors
    else:
        assert tensors["wscales"].shape == (24, 256) and tensors["wscales"].dtype == torch.float8_e4m3fn
        assert tensors["wtscale"].dtype == torch.float32 and tensors["wtscale"].shape == (1,)
    back = nf.to_svdquant_linear(tensors)
    assert back.rank == 20 and back.precision == precision
    for name in ("qweight", "smooth", "lora_down", "lora_up", "bias"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    assert torch.equal(back.wscales.view(torch.uint8), layer.wscales.view(torch.uint8))
    x = _x(384)
    assert torch.equal(back(x), layer(x))


def test_general_smoothing_costs_one_rounding_of_lora_down_only():
    layer = _svdquant_layer(128, 256, rank=32, pow2_smooth=False)
    back = nf.to_svdquant_linear(nf.from_svdquant_linear(layer))
    for name in ("qweight", "wscales", "smooth", "lora_up", "bias"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    torch.testing.assert_close(back.lora_down.float(), layer.lora_down.float(), rtol=2**-7, atol=0)
    x = _x(256).float()
    torch.testing.assert_close(back(x), layer(x), rtol=1e-2, atol=1e-2)


def test_nunchaku_semantics_match_the_layer():
    """nunchaku's y = (x/λ) Rᵀ + (x Dᵀ) Uᵀ + b, from the tensors alone, equals quantgate's unquantized-activation math."""
    layer = _svdquant_layer(128, 256, rank=16)
    residual, down, up, smooth = nf.dequantize_w4a4(nf.from_svdquant_linear(layer))
    assert torch.equal(residual, layer.residual()) and torch.equal(smooth, layer.smooth.float())
    x = torch.randn(7, 256, generator=_gen(3))
    ours = (x / smooth) @ residual.t() + (x @ down.t()) @ up.t() + layer.bias.float()
    ref = (x / layer.smooth.float()) @ layer.residual().t() + \
        ((x / layer.smooth.float()) @ layer.lora_down.float().t()) @ layer.lora_up.float().t() + layer.bias.float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_unsigned_input_shift_folded_into_bias():
    layer = _svdquant_layer(128, 256, rank=16, unsigned=True)
    tensors = nf.from_svdquant_linear(layer)
    residual, down, up, smooth = nf.dequantize_w4a4(tensors)
    bias = nf.unpack_channels(tensors["bias"]).float()
    x = torch.nn.functional.gelu(torch.randn(6, 256, generator=_gen(4)))
    # nunchaku: shift by 0.171875, divide by λ, quantize unsigned, no shift back; the bias compensates
    acts = fake_quantize_uint4((x + GELU_SHIFT) / smooth, 64)
    y_nunchaku = acts @ residual.t() + (x @ down.t()) @ up.t() + bias
    torch.testing.assert_close(y_nunchaku, layer(x), rtol=2e-2, atol=2e-2)
    back = nf.to_svdquant_linear(tensors, unsigned_input=True)
    assert back.unsigned_input
    # the folded bias was rounded to bf16 once: back within one bf16 step of the folded value
    torch.testing.assert_close(back.bias.float(), layer.bias.float(), rtol=0, atol=1e-2)


def test_wcscales_other_than_one_refused():
    tensors = nf.from_svdquant_linear(_svdquant_layer(128, 128, rank=16, precision="nvfp4"))
    tensors["wcscales"] = nf.pack_channels(torch.full((128,), 2.0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="wcscales"):
        nf.to_svdquant_linear(tensors)


def test_int4_weight_only_round_trip():
    torch.manual_seed(0)
    layer = Int4WeightOnlyLinear(nn.Linear(256, 128), group_size=64)
    tensors = nf.from_int4_weight_only_linear(layer)
    assert tensors["qweight"].shape == (32, 128) and tensors["qweight"].dtype == torch.int32
    assert tensors["wscales"].shape == (4, 128) and tensors["wzeros"].shape == (4, 128)
    # nunchaku's dequantization: q * wscales + wzeros
    codes, _, _, _ = nf.unpack_w4a16_awq(tensors)
    w = codes.float() * tensors["wscales"].t().float().repeat_interleave(64, 1) + \
        tensors["wzeros"].t().float().repeat_interleave(64, 1)
    torch.testing.assert_close(w, layer.weight(), rtol=0, atol=float(layer.scales.float().max()) * 2**-7 * 15)
    back = nf.to_int4_weight_only_linear(tensors)
    for name in ("qweight", "scales", "zeros", "bias"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    x = _x(256)
    assert torch.equal(back(x), layer(x))


def test_adanorm_interleave_and_scale_fold():
    torch.manual_seed(0)
    layer = Int4WeightOnlyLinear(nn.Linear(128, 6 * 64), group_size=64)
    tensors = nf.from_int4_weight_only_linear(layer, adanorm_splits=6)
    codes, scales, zeros, bias = nf.unpack_w4a16_awq(tensors)
    # nunchaku row 6c + j is diffusers chunk j's row c; chunks 1 and 4 (scale_msa, scale_mlp) carry +1
    assert torch.equal(scales[6 * 3 + 4], layer.scales[4 * 64 + 3])
    torch.testing.assert_close(bias[6 * 3 + 4].float(), layer.bias[4 * 64 + 3].float() + 1, rtol=0, atol=1e-2)
    torch.testing.assert_close(bias[6 * 3 + 2].float(), layer.bias[2 * 64 + 3].float(), rtol=0, atol=0)
    back = nf.to_int4_weight_only_linear(tensors, adanorm_splits=6)
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    torch.testing.assert_close(back.bias.float(), layer.bias.float(), rtol=0, atol=1e-2)


def test_checkpoint_names():
    assert nf.checkpoint_filename("int4", 32, "flux.1-dev") == "svdq-int4_r32-flux.1-dev.safetensors"
    cfg = nf.quantization_config("fp4", 32)
    assert cfg["weight"] == {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    assert nf.FLUX_DOUBLE_BLOCK["qkv_proj"][1] == ("attn.to_q", "attn.to_k", "attn.to_v")
    assert nf.V2_PARAM_NAMES["lora_down"] == "proj_down"
    assert nf.FLUX_BLOCK_PREFIXES["single"].format(i=0) + "mlp_fc2.qweight" == "single_transformer_blocks.0.mlp_fc2.qweight"
