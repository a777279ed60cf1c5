"""quantgate's SVDQuant reference checked against the math, on the CPU (small seeded tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantgate.measure.footprint import module_footprint
from quantgate.quant.int4 import pack_int4, unpack_int4
from quantgate.quant.lowrank import without_low_rank
from quantgate.quant.nvfp4 import E2M1_GRID, decode_e2m1, dequantize_nvfp4, encode_e2m1, fp8_dtype, quantize_nvfp4
from quantgate.quant.svdquant import (
    Int4WeightOnlyLinear,
    SmoothStats,
    SVDQuantConfig,
    SVDQuantLinear,
    block_linears,
    dequantize_int4_weight,
    fake_quantize_int4,
    low_rank_split,
    per_image_linears,
    quantize_int4_weight,
    quantize_model,
    smoothing_factors,
    storage_breakdown,
    svdquant_linear,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _structured_weight(out_features: int = 96, in_features: int = 128, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum (as trained layers have) plus a few large columns."""
    g = _gen(seed)
    u = torch.randn(out_features, 48, generator=g)
    v = torch.randn(48, in_features, generator=g)
    decay = torch.logspace(0, -2, 48)
    w = (u * decay) @ v / 8 + 0.01 * torch.randn(out_features, in_features, generator=g)
    w[:, [5, in_features // 2 + 6]] *= 6
    return w


def _outlier_inputs(rows: int = 256, in_features: int = 128, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, in_features, generator=_gen(seed))
    x[:, [3, in_features // 3, in_features - 29]] *= 40  # planted outlier channels, as diffusion activations have
    return x


def _linear(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(torch.linspace(-1, 1, weight.shape[0]))
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# -- the low-rank split ------------------------------------------------------------------------

def test_weight_reconstruction_error_falls_as_rank_grows() -> None:
    w = _structured_weight()
    errors = []
    for rank in (0, 4, 16, 48, 96):
        up, down = low_rank_split(w, rank, "exact")
        r = w - up @ down
        packed, scales = quantize_int4_weight(r, 64)
        errors.append(_rel(up @ down + dequantize_int4_weight(packed, scales), w))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.2 * errors[0]


def test_the_low_rank_part_alone_is_the_best_approximation_of_its_rank() -> None:
    w = _structured_weight()
    s = torch.linalg.svdvals(w)
    for rank in (1, 8, 32):
        up, down = low_rank_split(w, rank, "exact")
        # Eckart-Young: the error of the best rank-r approximation is the tail of the spectrum
        assert math.isclose(float(torch.linalg.norm(w - up @ down)), float(s[rank:].norm()), rel_tol=1e-4)


def test_with_full_rank_the_low_rank_branch_alone_reproduces_the_layer() -> None:
    w = _structured_weight(64, 64)
    x = _outlier_inputs(32, 64)
    layer = _linear(w)
    up, down = low_rank_split(w, 64, "exact")
    torch.testing.assert_close(up @ down, w, rtol=0, atol=1e-5)

    config = SVDQuantConfig(rank=64, max_rank_fraction=1.0, svd="exact", alphas=(None, 0.5))
    module, result = svdquant_linear(layer, x.abs().amax(0), x, config)
    assert result.rank == 64 and module.lora_up.shape == (64, 64)
    # The branch holds the whole weight (up to bf16 rounding of its factors); the residual is that rounding.
    xs = x / module.smooth.float()
    branch = xs @ module.lora_down.float().t() @ module.lora_up.float().t() + module.bias.float()
    assert _rel(branch, layer(x).detach()) < 0.01
    assert module.residual().abs().max() < 0.01 * w.abs().max()


def test_randomized_svd_matches_the_exact_one_on_a_low_rank_weight() -> None:
    g = _gen(3)
    w = torch.randn(200, 8, generator=g) @ torch.randn(8, 150, generator=g)
    up, down = low_rank_split(w, 8, "lowrank")
    torch.testing.assert_close(up @ down, w, rtol=0, atol=1e-3)


# -- smoothing -----------------------------------------------------------------------------------

def test_smoothing_factors_follow_the_smoothquant_rule() -> None:
    w = _structured_weight()
    a = _outlier_inputs().abs().amax(0)
    lam = smoothing_factors(a, w, 0.5)
    expected = (a.sqrt() / w.abs().amax(0).sqrt()).to(torch.bfloat16).float()
    torch.testing.assert_close(lam, expected)
    assert torch.equal(smoothing_factors(a, w, None), torch.ones(128))
    assert lam[3] > 5 * lam.median()  # outlier channels are scaled down in x, up in W


def test_smoothing_reduces_activation_quantization_error_on_outlier_channels() -> None:
    w, x = _structured_weight(), _outlier_inputs()
    y = x @ w.t()

    def w4a4_error(alpha: float | None) -> float:
        lam = smoothing_factors(x.abs().amax(0), w, alpha)
        packed, scales = quantize_int4_weight(w * lam, 64)
        return _rel(fake_quantize_int4(x / lam, 64) @ dequantize_int4_weight(packed, scales).t(), y)

    assert w4a4_error(0.5) < 0.7 * w4a4_error(None)


def test_the_strength_search_picks_smoothing_when_it_helps_and_never_does_worse() -> None:
    w, x = _structured_weight(), _outlier_inputs()
    config = SVDQuantConfig(rank=8, svd="exact")
    module, result = svdquant_linear(_linear(w), x.abs().amax(0), x[:128], config)
    assert result.alpha is not None
    assert result.output_error <= result.output_error_unsmoothed
    assert result.output_error < 0.15
    # What the module computes is what the search measured, on inputs it did not see too.
    y = _linear(w)(x[128:]).detach()
    assert _rel(module(x[128:]), y) < 0.15


def test_without_calibration_inputs_the_strength_is_the_middle_of_the_grid() -> None:
    w, x = _structured_weight(), _outlier_inputs()
    _, result = svdquant_linear(_linear(w), x.abs().amax(0), None, SVDQuantConfig(rank=8))
    assert result.alpha == 0.5 and math.isnan(result.output_error)


# -- quantization and packing --------------------------------------------------------------------

def test_int4_weight_packing_round_trips_exactly() -> None:
    w = _structured_weight()
    packed, scales = quantize_int4_weight(w, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 64) and scales.dtype == torch.bfloat16
    q = unpack_int4(packed)
    assert int(q.min()) >= -7 and int(q.max()) <= 7
    assert torch.equal(pack_int4(q), packed)
    torch.testing.assert_close(dequantize_int4_weight(packed, scales),
                               q.float() * scales.float().repeat_interleave(64, dim=1), rtol=0, atol=0)
    step = scales.float().repeat_interleave(64, dim=1)
    assert torch.all((dequantize_int4_weight(packed, scales) - w).abs() <= step / 2 + 1e-6)


def test_activation_fake_quantization_is_within_half_a_step_per_group() -> None:
    x = _outlier_inputs(16, 128)
    xq = fake_quantize_int4(x, 64)
    step = x.reshape(16, 2, 64).abs().amax(-1, keepdim=True) / 7
    assert torch.all((xq - x).reshape(16, 2, 64).abs() <= step / 2 + 1e-5)
    assert torch.equal(fake_quantize_int4(xq, 64), xq)  # idempotent: already on the grid


def test_module_residual_and_state_round_trip_through_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    w, x = _structured_weight(), _outlier_inputs()
    for precision in ("int4", "nvfp4"):
        module, _ = svdquant_linear(_linear(w), x.abs().amax(0), x[:64], SVDQuantConfig(precision=precision, rank=8))
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, tmp_path / f"{precision}.safetensors")
        clone = SVDQuantLinear(128, 96, 8, precision, module.group_size, bias=True)
        clone.load_state_dict(load_file(tmp_path / f"{precision}.safetensors"))
        assert torch.equal(clone.residual(), module.residual())
        assert torch.equal(clone(x[:4]), module(x[:4]))


# -- NVFP4 ---------------------------------------------------------------------------------------

def test_e2m1_codes_hold_every_grid_value_and_round_ties_to_even() -> None:
    grid = torch.tensor(E2M1_GRID)
    values = torch.cat([grid, -grid])  # 16 codes, -0.0 included
    codes = encode_e2m1(values)
    assert torch.equal(decode_e2m1(codes), values) and sorted(codes.tolist()) == list(range(16))
    assert torch.equal(unpack_int4(pack_int4(codes.to(torch.int8)), signed=False), codes)
    # midpoints go to the neighbour with the even code: 0.25 -> 0, 0.75 -> 1.0, 2.5 -> 2, 5 -> 6
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 100.0])
    assert decode_e2m1(encode_e2m1(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_nvfp4_blocks_of_16_with_e4m3_scales() -> None:
    w = _structured_weight()
    codes, block_scale, tensor_scale = quantize_nvfp4(w)
    assert block_scale.dtype == fp8_dtype() and block_scale.shape == (96, 8) and tensor_scale.shape == (1,)
    assert int(codes.max()) <= 15
    deq = dequantize_nvfp4(codes, block_scale, tensor_scale)
    assert _rel(deq, w) < 0.15
    # every dequantized value is a grid value times its block's scale
    per_block = deq.reshape(96, 8, 16) / (block_scale.float() * tensor_scale)[..., None]
    assert torch.all(torch.isin(per_block.abs().round(decimals=4), torch.tensor(E2M1_GRID)))


# -- the module and the model ----------------------------------------------------------------------

def test_the_low_rank_switch_turns_the_branch_off_and_restores_it() -> None:
    w, x = _structured_weight(), _outlier_inputs()
    model = nn.Sequential(svdquant_linear(_linear(w), x.abs().amax(0), x[:64], SVDQuantConfig(rank=16))[0])
    with_branch = model(x[:8])
    with without_low_rank(model) as count:
        without = model(x[:8])
    assert count == 1 and model[0].low_rank
    layer = model[0]
    branch = (x[:8] / layer.smooth.float()) @ layer.lora_down.float().t() @ layer.lora_up.float().t()
    torch.testing.assert_close(with_branch - without, branch, rtol=1e-4, atol=1e-3)
    assert torch.equal(model(x[:8]), with_branch)
    with pytest.raises(LookupError, match="no low-rank branch"), without_low_rank(nn.Linear(4, 4)):
        pass


def test_packed_storage_is_the_footprint() -> None:
    w, x = _structured_weight(), _outlier_inputs()
    module, _ = svdquant_linear(_linear(w), x.abs().amax(0), x[:64], SVDQuantConfig(rank=8))
    expected = 96 * 128 // 2 + 96 * 2 * 2 + 8 * (96 + 128) * 2 + 128 * 2 + 96 * 2  # packed, scales, branch, λ, bias
    assert module_footprint(module).total_bytes == expected
    w4a16 = Int4WeightOnlyLinear(_linear(w), 64)
    assert module_footprint(w4a16).total_bytes == 96 * 64 + 96 * 2 * 2 + 96 * 2 + 96 * 2  # packed, scale, zero, bias
    step = w4a16.scales.float().repeat_interleave(64, dim=1)  # half a step, plus half for the rounded zero point
    assert torch.all((w4a16.weight() - w).abs() <= step + 1e-6)


class _TinyDiT(nn.Module):
    """Blocks in a ModuleList with a per-image modulation linear, embedders outside."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.ModuleDict({"linear": nn.Linear(64, 128)}),
                                                   "ff": nn.Linear(64, 64)}) for _ in range(2))
        self.out = nn.Linear(64, 16)


def test_quantize_model_replaces_block_linears_and_per_image_linears_only() -> None:
    torch.manual_seed(0)
    model = _TinyDiT()
    per_image = r"blocks\.\d+\.norm\.linear"
    assert set(block_linears(model, per_image)) == {"blocks.0.ff", "blocks.1.ff"}
    stats = {"blocks.0.ff": {"absmax": torch.ones(64), "sample": torch.randn(32, 64)}}
    facts = quantize_model(model, stats, SVDQuantConfig(rank=4), per_image, progress=False)
    assert isinstance(model.blocks[0]["ff"], SVDQuantLinear) and isinstance(model.blocks[1]["ff"], SVDQuantLinear)
    assert isinstance(model.blocks[0]["norm"]["linear"], Int4WeightOnlyLinear)
    assert facts["w4a4_linears"] == 2 and facts["w4a16_linears"] == 2 and facts["bf16_linears"] == ["embed", "out"]
    assert facts["ranks"] == {4: 2}
    parts = storage_breakdown(model)
    assert sum(parts.values()) == module_footprint(model).total_bytes
    assert parts["w4a4_residual"] == 2 * 64 * 64 // 2 and parts["low_rank_branch"] == 2 * 4 * (64 + 64) * 2
    # a layer without statistics gets no smoothing (alpha None), one with them is searched
    assert sum(facts["alpha_counts"].values()) == 2 and "None" in facts["alpha_counts"]


def test_group_and_rank_adapt_to_narrow_layers() -> None:
    config = SVDQuantConfig()
    assert config.group_for(3072) == 64 and config.group_for(160) == 32 and config.group_for(32) == 32
    assert config.rank_for(3072, 3072) == 32 and config.rank_for(32, 32) == 4
    assert SVDQuantConfig(precision="nvfp4").group_for(3072) == 16
    with pytest.raises(ValueError, match="precision"):
        SVDQuantConfig(precision="int3")


# -- calibration statistics ----------------------------------------------------------------------

def test_smooth_stats_keep_the_absmax_and_a_reservoir_of_real_rows() -> None:
    batches = [torch.randn(3, 20, 16, generator=_gen(i)) for i in range(10)]
    stats = SmoothStats(16, capacity=24, per_call=4, seed=7)
    for b in batches:
        stats.update(b)
    rows = torch.cat([b.reshape(-1, 16) for b in batches])
    state = stats.state()
    torch.testing.assert_close(state["absmax"], rows.abs().amax(0))
    assert state["sample"].shape == (24, 16) and stats.seen == 40
    kept = rows.to(torch.bfloat16)
    assert all(any(torch.equal(r, k) for k in kept) for r in state["sample"])
    again = SmoothStats(16, capacity=24, per_call=4, seed=7)
    for b in batches:
        again.update(b)
    assert torch.equal(again.state()["sample"], state["sample"])


# -- the quantized checkpoint ---------------------------------------------------------------------

def test_a_saved_checkpoint_loads_into_a_fresh_model_with_the_same_output(tmp_path) -> None:
    from quantgate.quant import svdquant_store

    torch.manual_seed(0)
    model, fresh = _TinyDiT(), _TinyDiT()
    fresh.load_state_dict(model.state_dict())
    per_image = r"blocks\.\d+\.norm\.linear"
    layers = [*block_linears(model, per_image), *per_image_linears(model, per_image)]
    stats = {"blocks.0.ff": {"absmax": torch.ones(64), "sample": torch.randn(32, 64)}}
    facts = quantize_model(model, stats, SVDQuantConfig(rank=4), per_image, progress=False)
    directory = tmp_path / "quantized" / svdquant_store.checkpoint_key({"weights": "w"}, {"rank": 4}, {}, layers)
    svdquant_store.save(directory, model, layers, facts)
    assert svdquant_store.problem(directory) is None

    assert svdquant_store.load(directory, fresh, "cpu")["w4a4_linears"] == facts["w4a4_linears"]
    assert isinstance(fresh.blocks[1]["ff"], SVDQuantLinear)
    assert isinstance(fresh.blocks[0]["norm"]["linear"], Int4WeightOnlyLinear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        for block, again in zip(model.blocks, fresh.blocks, strict=True):
            assert torch.equal(block["ff"](x), again["ff"](x))
            assert torch.equal(block["norm"]["linear"](x), again["norm"]["linear"](x))


def test_a_damaged_or_different_checkpoint_is_refused_with_the_reason(tmp_path) -> None:
    from quantgate.quant import svdquant_store

    model = _TinyDiT()
    layers = list(block_linears(model, None))
    quantize_model(model, {}, SVDQuantConfig(rank=4), None, progress=False)
    key = svdquant_store.checkpoint_key({"weights": "w"}, {"rank": 4}, {}, layers)
    assert key != svdquant_store.checkpoint_key({"weights": "w"}, {"rank": 8}, {}, layers)
    directory = tmp_path / key
    svdquant_store.save(directory, model, layers, {})
    tensors = directory / svdquant_store.TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-10])
    assert "bytes, the manifest recorded" in svdquant_store.problem(directory)
    (directory / svdquant_store.MANIFEST).unlink()
    assert "(an interrupted write?)" in svdquant_store.problem(directory)
